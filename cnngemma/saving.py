"""Model folders that readers never see half-replaced.

Every save gets an id, written into `config.json`, `processor_config.json` and the metadata of each safetensors file.
A save is written completely into a staging folder, then renamed into place weights first and `config.json` last;
`load_model` (cnngemma.inference) reads the ids before and after loading and refuses a folder whose files come from two
saves, or that changed while it was read. A third-party `from_pretrained` ignores the ids.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from pathlib import Path

SAVE_ID = "save_id"
STAMPED_JSON = ("processor_config.json", "config.json")  # renamed last, in this order


def new_save_id() -> str:
    return uuid.uuid4().hex


def read_safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` of a safetensors file, from its header alone (8 + header bytes, not the tensors); a
    ValueError says why a file is not one."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path.name}: {len(prefix)} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(path.stat().st_size - 8, 100 << 20):
            raise ValueError(
                f"{path.name}: its header claims {length:,} bytes in a {path.stat().st_size:,}-byte file (truncated, "
                "or not safetensors)"
            )
        try:
            header = json.loads(file.read(length))
        except ValueError as error:
            raise ValueError(f"{path.name}: its header is not JSON ({error})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def stamp_safetensors(path: Path, extra: dict[str, str]):
    """Adds `extra` to a safetensors file's metadata. The tensors' offsets count from the end of the header, so
    the data is copied unchanged behind the new header (transformers' save_pretrained takes no metadata)."""
    with open(path, "rb") as source:
        (length,) = struct.unpack("<Q", source.read(8))
        header = json.loads(source.read(length))
        header["__metadata__"] = {**header.get("__metadata__", {}), **extra}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads headers with spaces to keep the tensors 8-byte aligned
        stamped = path.with_name(f".{path.name}.stamping")
        with open(stamped, "wb") as target:
            target.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(source, target, 1 << 24)
    os.replace(stamped, path)


def stamp(folder: Path, save_id: str):
    """Writes `save_id` into every file of a freshly saved (staging) folder that carries one."""
    for path in sorted(folder.glob("*.safetensors")):
        stamp_safetensors(path, {SAVE_ID: save_id})
    for name in STAMPED_JSON:
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text(encoding="utf-8"))
            (folder / name).write_text(json.dumps({**data, SAVE_ID: save_id}, indent=2) + "\n", encoding="utf-8")


def weight_files(folder: Path) -> list[Path]:
    """The model's safetensors files: model.safetensors, or the shards its index names (other .safetensors files in
    the folder, a user's or an adapter's, are not the model's)."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()
        return [folder / name for name in sorted(set(shards)) if (folder / name).is_file()]
    return []


def save_ids(folder: Path) -> dict[str, str | None]:
    """{file name: its save id or None} for the files that carry one; ValueError or OSError for an unreadable one."""
    ids = {}
    for path in weight_files(folder):
        ids[path.name] = read_safetensors_metadata(path).get(SAVE_ID)
    for name in STAMPED_JSON:
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text(encoding="utf-8"))
            ids[name] = data.get(SAVE_ID) if isinstance(data, dict) else None
    return ids


def mixed_saves(ids: dict[str, str | None]) -> str | None:
    """Why the files come from different saves, or None. Folders saved by other tools carry no ids: weights
    without one are not checked, but weights from one of our saves need config.json from the same save."""
    weights = {name: value for name, value in ids.items() if name.endswith(".safetensors")}
    present = {name: value for name, value in ids.items() if value is not None}
    if not any(weights.values()):
        return None
    if ids.get("config.json") is None or len(set(present.values())) > 1:
        return ", ".join(f"{name} from save {str(value)[:8]}" for name, value in ids.items())
    return None


def move_into_place(staging: Path, folder: Path) -> list[str]:
    """Renames every file of `staging` into `folder`: weights first, config.json last, so that a reader that finds
    config.json of this save finds its weights too. Returns the names moved."""
    order = {name: rank for rank, name in enumerate(STAMPED_JSON, start=2)}
    names = sorted(
        (p.name for p in staging.iterdir()), key=lambda n: (order.get(n, 0 if ".safetensors" in n else 1), n)
    )
    for name in names:
        os.replace(staging / name, folder / name)
    staging.rmdir()
    return names


def write_model_folder(model, processor, output: Path, card: str | None = None):
    """Saves a model and its processor as a new folder: refused if `output` holds anything; written beside it and
    renamed into place whole, so an interrupted save leaves no folder that looks complete."""
    from .backbones import notice_files

    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        from .errors import UsageError

        raise UsageError(f"{output} already exists and is not an empty folder; pass a new folder.")
    staging = output.with_name(f".{output.name}.partial")  # ours by its name: a killed save's is replaced
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if card is not None:
            (staging / "README.md").write_text(card, encoding="utf-8")
        for path in notice_files(model.config):  # the licence files the decoder's weights come with
            shutil.copyfile(path, staging / path.name)
        stamp(staging, new_save_id())
        if output.exists():
            output.rmdir()
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

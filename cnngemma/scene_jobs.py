"""Scene captioning jobs: tiles in fixed batches, per-shard JSON lines in a work folder beside the output (so a killed
run resumes where it stopped), shards over processes with accelerate or `--shard i/N`, and one atomic merge into
GeoJSON (or GeoParquet), with a preview PNG per scene.

Work folder layout (`OUTPUT.work/`): `job.json` (the settings and their hash, the scenes), and one folder per shard,
`shard-I-of-N/`, holding `tiles.jsonl` (one line per finished tile: its key and its GeoJSON feature) and, once the
shard is finished, `done.json`. A tile is done when a line holds its key: the scene's path, size and mtime, the window
and the settings hash. A batch counts only when all its tiles are there, so a resumed run sees the same batches.

A shard writes its batches in ascending order and never a done one again, so each `tiles.jsonl` is in tile order, but
for a batch cut short by a kill and written whole after it. The merge streams the shards' lines through a k-way merge
and holds one batch per shard, never the features of the whole job.
"""

from __future__ import annotations

import datetime
import hashlib
import heapq
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import rasterio
from rasterio.windows import Window

from .errors import RunError, UsageError, first_line
from .inference import caption_batch as caption_images
from .inference import prepare_for_captioning
from .outputs import RunLock, pid_alive, version, write_text_atomically
from .scenes import Scene, TileSettings, describe

TOOL = "caption.py scenes"
HEADER_START = '{"type": "FeatureCollection", "cnngemma": {"tool": "caption.py scenes"'
BLOCK_CACHE_BYTES = 64 * 2**20  # rasterio passes an integer GDAL_CACHEMAX to GDAL as bytes
SHARD_FOLDER = re.compile(r"shard-(\d+)-of-(\d+)")


@dataclass
class JobOptions:
    """What a scene job needs from the command line."""

    output: Path
    scenes: list[list[Path]]  # one list of files per scene (several for a --stack)
    tiles: TileSettings
    model: str | None = None
    revision: str | None = None
    prompt: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 32
    num_beams: int = 1
    quantize: str = "none"
    compile: bool = False
    adapter_base: str = "trained"  # an adapter folder's base: as trained, 4bit or full
    device: str | None = None
    shard: tuple[int, int] | None = None  # (index, count) without a launcher
    image_size: int = 224  # the model's input side, for the ground-resolution check
    attribution: str | None = None  # the imagery's credit line, printed on the previews


@dataclass(slots=True)
class Tile:
    scene: int  # index into the plan's scenes
    window: tuple[int, int, int, int]  # col_off, row_off, width, height
    key: str


class Plan:
    """Every tile of the job in output order (scenes in the given order, each row by row) and the fixed batches."""

    def __init__(self, scenes: list[Scene], settings_hash: str, batch_size: int):
        self.scenes, self.tiles, self.batch_size = scenes, [], batch_size
        for index, scene in enumerate(scenes):
            identity = scene.key()
            for window in scene.windows():
                box = (int(window.col_off), int(window.row_off), int(window.width), int(window.height))
                digest = hashlib.sha256(json.dumps([identity, box, settings_hash]).encode()).hexdigest()[:32]
                self.tiles.append(Tile(index, box, digest))
        self.batches = [
            list(range(i, min(i + batch_size, len(self.tiles)))) for i in range(0, len(self.tiles), batch_size)
        ]
        self.numbers = {tile.key: number for number, tile in enumerate(self.tiles)}


def shard_batches(count: int, index: int, shards: int) -> list[int]:
    """Batch numbers of shard `index` of `shards`: contiguous, the first `count % shards` shards one longer, as
    accelerate's `split_between_processes` splits a list."""
    size, extra = divmod(count, shards)
    start = index * size + min(index, extra)
    return list(range(start, start + size + (1 if index < extra else 0)))


def model_identity(model: str, revision: str | None) -> str:
    """A local model folder by its files' names, sizes and mtimes (a re-save changes it); a Hub id by id@revision."""
    folder = Path(model)
    if not folder.is_dir():
        return f"{model}@{revision or 'main'}"
    files = sorted(
        (path.name, path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".")
    )
    return f"{folder.resolve()}#{hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]}"


def job_settings(options: JobOptions) -> dict:
    """Everything that changes a caption or a batch, as JSON types; a resumed run must match it."""
    settings = {
        **asdict(options.tiles),
        "model": model_identity(options.model, options.revision),
        "prompt": options.prompt,
        "batch_size": options.batch_size,
        "max_new_tokens": options.max_new_tokens,
        "num_beams": options.num_beams,
        "quantize": options.quantize,
        "compile": options.compile,
    }
    if options.adapter_base != "trained":  # absent otherwise: jobs started before the flag keep their hash
        settings["adapter_base"] = options.adapter_base
    return json.loads(json.dumps(settings))  # tuples as lists, as job.json gives them back


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def work_folder(output: Path) -> Path:
    return output.with_name(output.name + ".work")


def check_output(output: Path):
    """Refuses, before any work, an output that is not a new path or an earlier output of this command (by the
    record in its header or Parquet metadata), and a work folder holding files this command did not write."""
    if output.suffix.lower() not in (".geojson", ".json", ".parquet"):
        raise UsageError(
            f"--output {output}: expected a .geojson path (a GeoJSON FeatureCollection) or a .parquet one (GeoParquet, "
            "for runs too large for GeoJSON)."
        )
    if output.is_dir() or (output.exists() and not is_own_output(output)):
        kind = "a folder" if output.is_dir() else "a file that caption.py did not write"
        raise UsageError(f"--output {output} is {kind}; nothing was changed. Pass a new path or an earlier output.")
    work = work_folder(output)
    if work.exists():
        job = read_json(work / "job.json")
        if not work.is_dir() or (any(work.iterdir()) and (job or {}).get("tool") != TOOL):
            raise UsageError(
                f"{work} is in the way: caption.py keeps its work there, but it holds other files. Move it away or "
                "pass another --output; nothing was changed."
            )


def is_own_output(path: Path) -> bool:
    if path.suffix.lower() == ".parquet":
        from .geoparquet import tool_of

        return tool_of(path) == TOOL
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline(len(HEADER_START)) == HEADER_START
    except (OSError, UnicodeDecodeError):
        return False


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def start_job(work: Path, settings: dict, scenes: list[Scene]) -> str:
    """Writes or checks `job.json`; a job started with other settings is refused, naming what changed."""
    digest = settings_hash(settings)
    existing = read_json(work / "job.json")
    if existing is not None and existing.get("settings_hash") != digest:
        before = existing.get("settings", {})
        changed = [
            f"{name} {before.get(name)!r} -> {settings.get(name)!r}"
            for name in sorted(set(before) | set(settings))
            if before.get(name) != settings.get(name)
        ]
        raise UsageError(
            f"{work} holds tiles captioned with other settings ({'; '.join(changed)}). Pass the same settings to "
            f"resume, or delete {work} (or pass another --output) to start over."
        )
    work.mkdir(parents=True, exist_ok=True)
    job = {
        "tool": TOOL,
        "settings": settings,
        "settings_hash": digest,
        "scenes": [list(map(str, s.paths)) for s in scenes],
    }
    if existing != job:
        write_text_atomically(work / "job.json", json.dumps(job, indent=1) + "\n")
    return digest


def shard_lines(work: Path) -> list[Path]:
    """The `tiles.jsonl` of every shard folder in the work folder, in name order."""
    shards = sorted(work.iterdir()) if work.is_dir() else []
    return [
        shard / "tiles.jsonl"
        for shard in shards
        if SHARD_FOLDER.fullmatch(shard.name) and (shard / "tiles.jsonl").is_file()
    ]


def tile_records(path: Path):
    """(key, feature) for each line of a shard's lines file; a line cut short by a kill is skipped."""
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
                yield record["key"], record["feature"]
            except (ValueError, KeyError, TypeError):
                continue


def finished_keys(work: Path) -> set[str]:
    """The keys of every tile with a line in the work folder's shards."""
    return {key for path in shard_lines(work) for key, _ in tile_records(path)}


def shard_features(path: Path, plan: Plan):
    """(tile number, feature) of one shard in tile order, a batch at a time. A batch written again after a kill cut
    its first write short starts over at a lower tile number: it replaces the partial one."""
    batch, tiles, last = None, [], -1
    for key, feature in tile_records(path):
        number = plan.numbers.get(key)
        if number is None:  # a tile of a scene that has changed since (its key holds the size and mtime)
            continue
        this = number // plan.batch_size
        if batch is not None and this < batch:
            raise RunError(
                f"{path}: tile {number} comes after tile {last}; the shard's lines are out of order, which "
                "caption.py never writes. Delete the work folder to caption the job again."
            )
        if this != batch:  # the next batch: the one before is whole
            yield from tiles
            batch, tiles = this, []
        elif number <= last:  # the same batch again, written whole after a kill cut it short
            tiles = []
        tiles.append((number, feature))
        last = number
    yield from tiles


def merged_features(plan: Plan, work: Path):
    """Every tile's feature in plan order, from all shards (a tile in several, after the shard count changed: the
    last shard's)."""
    streams = [shard_features(path, plan) for path in shard_lines(work)]
    expected, held = 0, None
    for number, feature in heapq.merge(*streams, key=lambda item: item[0]):
        if held is not None and number != held[0]:
            yield held
            expected += 1
        if number > expected:
            raise RunError(f"{work}: tile {expected} has no line; run the unfinished shards with the same flags.")
        held = (number, feature)
    if held is not None:
        yield held


def done_batches(plan: Plan, found: set[str]) -> set[int]:
    return {number for number, batch in enumerate(plan.batches) if all(plan.tiles[i].key in found for i in batch)}


def open_for_append(path: Path):
    """The shard's lines file opened for appending, after cutting a last line that a kill left without its end."""
    if path.exists():
        with open(path, "rb+") as file:
            data = file.read()
            if data and not data.endswith(b"\n"):
                file.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


class Captioner:
    """A loaded model and its processor, captioning batches of tiles with fixed generation settings."""

    def __init__(self, model, processor, generation: dict, prompt: str | None = None, fixed_batch: int = 0):
        self.model, self.processor, self.generation = model, processor, generation
        self.prompt, self.fixed_batch = prompt, fixed_batch
        self.device = next(model.parameters()).device
        self.size = model.config.image_size
        self.resample = processor.image_processor.resample

    @classmethod
    def load(cls, options: JobOptions, device: str) -> Captioner:
        """The job's model, loaded once, on `device`, quantized or compiled as the flags say."""
        model, processor, generation = prepare_for_captioning(
            options.model,
            revision=options.revision,
            device=device,
            quantize=options.quantize,
            compile=options.compile,
            max_new_tokens=options.max_new_tokens,
            num_beams=options.num_beams,
            prompt=options.prompt,
            adapter_base=options.adapter_base,
        )
        return cls(model, processor, generation, options.prompt, options.batch_size if options.compile else 0)

    def __call__(self, images) -> list[str]:
        return caption_images(
            self.model, self.processor, images, self.prompt, self.generation, self.device, self.fixed_batch
        )


def tile_feature(scene: Scene, tile: Tile, transformer, status: str, fraction: float, model_name: str) -> dict:
    """The tile's GeoJSON feature, its caption still None."""
    geometry, bounds = scene.footprint(Window(*tile.window), transformer)
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {
            "caption": None,
            "status": status,
            "window": list(tile.window),
            "bounds": bounds,
            "crs": scene.crs.to_string() if scene.crs is not None else None,
            "scene": scene.name,
            "nodata_fraction": round(fraction, 6),
            "model": model_name,
        },
    }


class SceneReader:
    """Keeps the scene of the current tiles open, with its transformer to WGS 84; tiles come scene by scene."""

    def __init__(self):
        self.scene, self.transformer = None, None

    def get(self, scene: Scene) -> Scene:
        if scene is not self.scene:
            self.close()
            self.scene, self.transformer = scene.open(), scene.to_wgs84()
        return scene

    def close(self):
        if self.scene is not None:
            self.scene.close()
        self.scene = None


def caption_batch(plan: Plan, indices: list[int], captioner, reader: SceneReader, model_name: str):
    """The features of one batch of tiles, in order ((key, feature) pairs), and the seconds spent reading and
    tiling. Tiles over `max_nodata` are not read into the batch; they get status 'nodata' and no caption."""
    started = time.perf_counter()
    images, features = [], []
    for index in indices:
        tile = plan.tiles[index]
        scene = reader.get(plan.scenes[tile.scene])
        try:
            image, fraction = scene.tile_image(Window(*tile.window), captioner.size, captioner.resample)
        except Exception as error:  # rasterio raises its own and GDAL's errors for a damaged block
            raise RunError(
                f"{scene.name}: cannot read the tile at window {list(tile.window)} ({type(error).__name__}: "
                f"{first_line(error)}). The tiles done so far are kept; fix or drop the file and run again."
            ) from None
        status = "nodata" if image is None else "captioned"
        features.append((tile.key, tile_feature(scene, tile, reader.transformer, status, fraction, model_name)))
        images += [image] if image is not None else []
    reading = time.perf_counter() - started
    captions = iter(captioner(images) if images else [])
    for _, feature in features:
        if feature["properties"]["status"] == "captioned":
            feature["properties"]["caption"] = next(captions)
    return features, reading


def run_shard(
    plan: Plan, batches: list[int], found: set[str], shard: Path, captioner_factory, model_name, show
) -> dict:
    """Captions the shard's missing batches, appending one line per tile after each batch; returns counts and the
    seconds spent reading and tiling vs in total."""
    from tqdm.auto import tqdm

    done = done_batches(plan, found)
    todo = [number for number in batches if number not in done]
    counts = {"tiles": sum(len(plan.batches[n]) for n in batches), "captioned": 0, "nodata": 0, "reused": 0}
    counts["reused"] = counts["tiles"] - sum(len(plan.batches[n]) for n in todo)
    timing = {"reading": 0.0, "total": 0.0}
    if not todo:
        return counts | timing
    captioner = captioner_factory()
    started = time.perf_counter()
    total = sum(len(plan.batches[n]) for n in todo)
    progress = tqdm(total=total, desc="captioning", unit="tiles", disable=not show, file=sys.stderr)
    reader = SceneReader()
    with open_for_append(shard / "tiles.jsonl") as lines:
        for number in todo:
            features, reading = caption_batch(plan, plan.batches[number], captioner, reader, model_name)
            timing["reading"] += reading
            for _, feature in features:
                counts[feature["properties"]["status"]] += 1
            # one write per batch: a kill leaves whole batches and at most one cut line, which is ignored
            lines.write("".join(json.dumps({"key": key, "feature": feature}) + "\n" for key, feature in features))
            lines.flush()
            progress.update(len(features))
        os.fsync(lines.fileno())
    reader.close()
    progress.close()
    timing["total"] = time.perf_counter() - started
    return counts | timing


def numbered(number: int, feature: dict) -> dict:
    """The feature with its number in the job as GeoJSON's `id`, after `type`."""
    return {"type": "Feature", "id": number, **{k: v for k, v in feature.items() if k != "type"}}


def caption_scene(
    scene: Scene, captioner: Captioner, batch_size: int = 8, model_name: str = "", seconds: float | None = None
) -> list[dict]:
    """One scene's tiles captioned in memory, without a work folder (for the app), as numbered GeoJSON features;
    with `seconds`, no batch starts after that time, so fewer features may come back."""
    plan = Plan([scene], "", batch_size)
    reader, features, deadline = SceneReader(), [], time.monotonic() + (seconds or math.inf)
    try:
        for batch in plan.batches:
            if time.monotonic() > deadline:
                break
            features += [feature for _, feature in caption_batch(plan, batch, captioner, reader, model_name)[0]]
    finally:
        reader.close()
    return [numbered(number, feature) for number, feature in enumerate(features)]


def write_output(output: Path, features, record: dict):
    """Streams the numbered features (GeoJSON, or GeoParquet for .parquet) into a temporary file beside `output`
    and renames it into place once all are written."""
    for stale in output.parent.glob(f".{output.name}.partial-*"):  # left by a merge that was killed
        if stale.name.rpartition("-")[2].isdigit() and not pid_alive(int(stale.name.rpartition("-")[2])):
            stale.unlink(missing_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        if output.suffix.lower() == ".parquet":
            from .geoparquet import GeoParquetWriter

            writer = GeoParquetWriter(partial, record)
            for feature in features:
                writer.write(feature)
            writer.close()
        else:
            with open(partial, "w", encoding="utf-8") as file:
                file.write(json.dumps({"type": "FeatureCollection", "cnngemma": record})[:-1] + ', "features": [\n')
                for index, feature in enumerate(features):
                    file.write(("" if index == 0 else ",\n") + json.dumps(feature))
                file.write("\n]}\n")
        with open(partial, "rb") as file:
            os.fsync(file.fileno())
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def with_previews(plan: Plan, features, output: Path, attribution: str | None, written: list[Path]):
    """The features passed on, numbered, each also drawn on its scene's preview (`scene_preview`); a scene's preview
    is saved when its last tile has gone by, and its path added to `written`."""
    from .scene_preview import Preview, preview_path

    preview, current = None, None
    for number, feature in features:
        scene = plan.tiles[number].scene
        if scene != current:
            close_preview(preview, written)
            preview, current = (
                Preview(plan.scenes[scene], preview_path(output, scene, plan.scenes[scene]), attribution),
                scene,
            )
        preview.add(number, feature)
        yield numbered(number, feature)
    close_preview(preview, written)


def close_preview(preview, written: list[Path]):
    if preview is not None:
        try:
            if preview.save():
                written.append(preview.path)
        finally:
            preview.scene.close()


def finish(output: Path, plan: Plan, work: Path, settings: dict, attribution: str | None):
    """The merge: every tile's line checked for, then the shards streamed into the output and the previews."""
    found = finished_keys(work)
    missing = [tile for tile in plan.tiles if tile.key not in found]
    if missing:
        first = missing[0]
        raise RunError(
            f"{output}: {len(missing)} of {len(plan.tiles)} tiles are not captioned yet (the first: "
            f"{plan.scenes[first.scene].name} window {list(first.window)}); unfinished shards: "
            f"{', '.join(unfinished_shards(work)) or 'none'}. Run them with the same flags, then merge."
        )
    del found
    record = {
        "tool": TOOL,
        "version": version(),
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "scenes": [scene.name for scene in plan.scenes],
    }
    previews = []
    write_output(output, with_previews(plan, merged_features(plan, work), output, attribution, previews), record)
    shown = f"; preview{'s' if len(previews) > 1 else ''} {', '.join(map(str, previews[:3]))}" if previews else ""
    shown += f" and {len(previews) - 3} more" if len(previews) > 3 else ""
    print(f"wrote {output}: {len(plan.tiles)} feature(s) from {len(plan.scenes)} scene(s){shown}.", file=sys.stderr)


def unfinished_shards(work: Path) -> list[str]:
    """`I/N` for every shard of every shard count seen in the work folder that has no completion marker."""
    counts = {
        int(m[2]) for shard in (work.iterdir() if work.is_dir() else []) if (m := SHARD_FOLDER.fullmatch(shard.name))
    }
    return [
        f"{index}/{count}"
        for count in sorted(counts)
        for index in range(count)
        if not (work / f"shard-{index}-of-{count}" / "done.json").is_file()
    ]


def build_plan(options: JobOptions, show: bool) -> tuple[Plan, dict, str]:
    """Opens every scene (metadata only), says what it will do, and checks the work folder's settings."""
    scenes, lines = [], []
    for paths in options.scenes:
        try:
            scenes.append(Scene(paths, options.tiles))
        except OSError as error:
            raise RunError(f"{error}. Expected a raster file (GeoTIFF, COG, JPEG 2000, ...).") from None
    settings = job_settings(options)
    digest = start_job(work_folder(options.output), settings, scenes)
    for scene in scenes:
        lines += [line for line in describe(scene, options.image_size) if line]
    if show:
        for line in lines:
            print(line, file=sys.stderr)
    return Plan(scenes, digest, options.batch_size), settings, digest


def caption_scenes(options: JobOptions) -> int:
    """Runs this process's shard of the job, then (on the main process, or alone) merges the output."""
    check_output(options.output)
    state, index, count = None, 0, 1
    if options.shard is not None:
        index, count = options.shard
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by accelerate launch or torchrun
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=options.device == "cpu" or not torch.cuda.is_available())
        index, count = state.process_index, state.num_processes
    main = index == 0 if state is not None else True
    # Tiles are read once, in order: a small block cache keeps memory flat on scenes of any size (GDAL's default
    # cache is 5% of the RAM, which a scene larger than that fills).
    with rasterio.Env(GDAL_CACHEMAX=BLOCK_CACHE_BYTES):
        return run_job(options, state, index, count, main)


def run_job(options: JobOptions, state, index: int, count: int, main: bool) -> int:
    plan, settings, digest = build_plan(options, show=main)
    work = work_folder(options.output)
    shard = work / f"shard-{index}-of-{count}"
    shard.mkdir(parents=True, exist_ok=True)
    device = options.device or (str(state.device) if state is not None else None)
    with RunLock(shard, flag="--output"):
        (shard / "done.json").unlink(missing_ok=True)
        found = finished_keys(work)
        numbers = list(range(len(plan.batches)))
        if state is not None:
            with state.split_between_processes(numbers) as mine:
                batches = list(mine)
        else:
            batches = shard_batches(len(numbers), index, count)

        def factory():
            import torch

            chosen = device or ("cuda" if torch.cuda.is_available() and options.quantize == "none" else "cpu")
            return Captioner.load(options, chosen)

        result = run_shard(plan, batches, found, shard, factory, options.model, show=main)
        write_text_atomically(shard / "done.json", json.dumps({"batches": batches, "settings_hash": digest, **result}))
    if main:
        share = (
            f"; reading and tiling took {100 * result['reading'] / result['total']:.1f}% of {result['total']:.1f} s"
            if result["total"]
            else ""
        )
        speed = (
            f", {(result['captioned'] + result['nodata']) / result['total']:.2f} tiles/s" if result["total"] else ""
        )
        print(
            f"{f'shard {index}/{count}: ' if count > 1 else ''}{result['tiles']} tile(s): {result['captioned']} "
            f"captioned, {result['nodata']} "
            f"no-data (over {options.tiles.max_nodata:g} invalid), {result['reused']} reused from {work}{speed}{share}.",
            file=sys.stderr,
        )
    if state is not None:
        state.wait_for_everyone()
    if options.shard is not None and count > 1:
        print(
            f"shard {index}/{count} done. When every shard is done: caption.py --merge --output {options.output}",
            file=sys.stderr,
        )
        return 0
    if main:
        finish(options.output, plan, work, settings, options.attribution)
    return 0


def merge(output: Path, attribution: str | None = None) -> int:
    """`--merge`: the GeoJSON from the shards in `OUTPUT.work`, with the settings and scenes its job.json holds."""
    work = work_folder(output)
    job = read_json(work / "job.json")
    if job is None or job.get("tool") != TOOL:
        raise UsageError(f"--merge --output {output}: no job in {work} (no job.json). Run the shards first.")
    check_output(output)
    settings = job["settings"]
    names = set(TileSettings.__dataclass_fields__)
    tiles = TileSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k in names})
    try:
        scenes = [Scene(paths, tiles) for paths in job["scenes"]]
    except OSError as error:
        raise RunError(f"{error}: a scene of the job is gone. Restore it, or start the job over.") from None
    plan = Plan(scenes, job["settings_hash"], settings["batch_size"])
    with rasterio.Env(GDAL_CACHEMAX=BLOCK_CACHE_BYTES):  # the previews read each scene whole, decimated
        finish(output, plan, work, settings, attribution)
    return 0

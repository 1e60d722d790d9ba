"""Peak RSS of `caption.py --merge` over a job of many tiles: a 20,000 px scene cut into 40 px tiles (250,000
features, each with a caption), its lines written as two finished shards would write them. The merge streams the
shards, so its memory should not grow with the features; `--repo` measures another checkout's caption.py on the same
work folder (before/after).

    python -m scripts.measure_merge_memory [--side 20000] [--tile 40] [--repo /path/to/other/checkout]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from cnngemma import scene_jobs
from cnngemma.scenes import Scene, TileSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPTION = "There are many white planes parked near the terminal building of the airport ."


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Peak RSS of caption.py --merge on a job of many tiles.")
    parser.add_argument("--side", type=int, default=20000, help="Side of the scene in pixels (default 20000).")
    parser.add_argument("--tile", type=int, default=40, help="Tile side (default 40: 250,000 tiles at 20000).")
    parser.add_argument("--repo", action="append", default=[], help="Checkouts whose caption.py merges (repeatable).")
    parser.add_argument("--folder", default="/tmp", help="Where the job is written, and deleted after.")
    return parser.parse_args(argv)


def write_job(folder: Path, side: int, tile: int) -> Path:
    """A constant-valued tiled GeoTIFF (compressed: a few MB) and a finished two-shard work folder for it."""
    raster = folder / "scene.tif"
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint16", tiled=True, compress="deflate")
    with rasterio.open(
        raster, "w", crs="EPSG:32618", transform=from_origin(400000, 4200000, 10, 10), **profile
    ) as out:
        for _, window in out.block_windows(1):
            out.write(np.full((3, window.height, window.width), 500, np.uint16), window=window)
    tiles = TileSettings(tile=tile)
    scene = Scene([raster], tiles)
    settings = {**json.loads(json.dumps(asdict(tiles))), "batch_size": 16, "model": "synthetic"}
    output = folder / "tiles.geojson"
    work = scene_jobs.work_folder(output)
    digest = scene_jobs.start_job(work, settings, [scene])
    plan, transformer = scene_jobs.Plan([scene], digest, 16), scene.to_wgs84()
    for index in range(2):
        shard = work / f"shard-{index}-of-2"
        shard.mkdir()
        with open(shard / "tiles.jsonl", "w", encoding="utf-8") as lines:
            for batch in scene_jobs.shard_batches(len(plan.batches), index, 2):
                for number in plan.batches[batch]:
                    feature = scene_jobs.tile_feature(scene, plan.tiles[number], transformer, "captioned", 0.0, "m")
                    feature["properties"]["caption"] = CAPTION
                    lines.write(json.dumps({"key": plan.tiles[number].key, "feature": feature}) + "\n")
        (shard / "done.json").write_text("{}")
    return output


def merge_rss(repo: Path, output: Path) -> dict:
    """Peak RSS in MB and wall seconds of `caption.py --merge` from `repo`, in a fresh process."""
    output.unlink(missing_ok=True)
    started = time.perf_counter()
    command = [sys.executable, str(repo / "caption.py"), "--merge", "--output", str(output)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=repo)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{repo}: caption.py --merge failed:\n{stderr[-2000:]}")
    features = len(json.loads(output.read_text())["features"])
    seconds = round(time.perf_counter() - started, 1)
    return {"features": features, "peak_rss_mb": round(usage.ru_maxrss / 1024), "seconds": seconds}


def main(argv=None):
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="cnngemma-merge-memory-", dir=args.folder))
    try:
        output = write_job(folder, args.side, args.tile)
        results = {}
        for repo in [REPO_ROOT, *map(Path, args.repo)]:
            results[str(repo)] = merge_rss(repo.resolve(), output)
            print(f"{repo}: {results[str(repo)]}", file=sys.stderr)
        results["geojson_mb"] = round(output.stat().st_size / 2**20)
        print(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(folder)  # made by mkdtemp above: only this run's scene, work folder and outputs


if __name__ == "__main__":
    main()

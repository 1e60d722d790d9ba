"""Peak memory of caption.py's scene mode on a 20,000 x 20,000 x 3 uint16 tiled GeoTIFF against a 2,000 px one, both
captioned with --tile 2000: windowed reads should make the large scene cost about what the small one costs.

    python -m scripts.measure_scene_memory --model outputs/cnngemma-demo [--side 20000] [--folder /tmp]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Peak RSS of caption.py on a large and a small scene.")
    parser.add_argument("--model", required=True, help="A saved CNNGemma folder.")
    parser.add_argument("--side", type=int, default=20000, help="Side of the large scene in pixels (default 20000).")
    parser.add_argument("--small-side", type=int, default=2000, help="Side of the small scene (default 2000).")
    parser.add_argument("--tile", type=int, default=2000, help="--tile for both runs (default 2000).")
    parser.add_argument("--folder", default="/tmp", help="Where the scenes are written, and deleted after.")
    return parser.parse_args(argv)


def write_scene(path: Path, side: int, block: int = 512):
    """A tiled uint16 GeoTIFF with varied, valid content (fields of noise over a gradient), written block row by
    block row so that the writer never holds the scene."""
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint16", tiled=True, blockxsize=256)
    profile |= dict(blockysize=256, crs="EPSG:32618", transform=from_origin(435730, 4179460, 0.5, 0.5), BIGTIFF="YES")
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as out:
        for row in range(0, side, block):
            height = min(block, side - row)
            rows = np.arange(row, row + height)[:, None]
            base = (1000 + 400 * np.sin(rows / 700) + 300 * np.cos(np.arange(side)[None, :] / 900)).astype(np.float32)
            data = np.stack([base + band * 150 + rng.normal(0, 60, base.shape) for band in range(3)])
            out.write(np.clip(data, 1, 65535).astype(np.uint16), window=Window(0, row, side, height))


def peak_rss(model: str, scene: Path, tile: int, output: Path) -> tuple[float, float, str]:
    """Peak RSS in MB and wall seconds of one caption.py run in a fresh process, and its last stderr line."""
    command = [sys.executable, str(REPO_ROOT / "caption.py"), "--model", model, str(scene), "--tile", str(tile)]
    command += ["--output", str(output), "--max-new-tokens", "8"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"caption.py failed on {scene}:\n{stderr[-2000:]}")
    lines = [line for line in stderr.splitlines() if "tile(s):" in line]
    return usage.ru_maxrss / 1024, time.perf_counter() - started, lines[-1] if lines else ""


def main(argv=None):
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="cnngemma-scene-memory-", dir=args.folder))
    try:
        results = {}
        for name, side in (("small", args.small_side), ("large", args.side)):
            scene = folder / f"{name}.tif"
            started = time.perf_counter()
            write_scene(scene, side)
            print(f"wrote {scene} ({side} x {side} x 3 uint16, {scene.stat().st_size / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr)  # fmt: skip
            rss, seconds, summary = peak_rss(args.model, scene, args.tile, folder / f"{name}.geojson")
            tiles = len(json.loads((folder / f"{name}.geojson").read_text())["features"])
            results[name] = {"side": side, "tiles": tiles, "peak_rss_mb": round(rss), "seconds": round(seconds, 1)}
            print(f"{name}: {results[name]} ({summary})", file=sys.stderr)
            scene.unlink()
        ratio = results["large"]["peak_rss_mb"] / results["small"]["peak_rss_mb"]
        results["large_over_small"] = round(ratio, 3)
        print(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(folder)  # made by mkdtemp above: only this run's scenes and outputs


if __name__ == "__main__":
    main()

"""A preview PNG per captioned scene, for people rather than programs: the stretched scene with the tile grid, a
number on each tile, a legend of the captions by number, and the imagery's attribution; at most PREVIEW_SIDE wide."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .scenes import Scene

PREVIEW_SIDE = 1024
LEGEND_LINES = 40  # captions listed under the picture; the rest are in the GeoJSON
SOFTWARE = "caption.py scenes"  # the PNG's Software text: a preview with another one is never overwritten


def preview_path(output: Path, index: int, scene: Scene) -> Path:
    return output.with_name(f"{output.stem}-preview-{index}-{scene.paths[0].stem}.png")


def is_own_preview(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            return image.info.get("Software") == SOFTWARE
    except OSError:
        return False


def render_preview(scene: Scene, items: list[tuple[int, dict]], path: Path, attribution: str | None = None) -> bool:
    """Writes the preview of `scene` with its features `items` ((feature id, feature) pairs) to `path`; a file
    there that is not an earlier preview is kept, with a warning. Returns whether it was written."""
    if path.exists() and not is_own_preview(path):
        print(f"warning: {path} exists and is not a preview written by caption.py: kept, no preview.", file=sys.stderr)
        return False
    picture = scene.open().overview(PREVIEW_SIDE)
    scale = picture.width / scene.width
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    draw = ImageDraw.Draw(picture)
    for number, feature in items:
        col, row, width, height = feature["properties"]["window"]
        box = [col * scale, row * scale, (col + width) * scale - 1, (row + height) * scale - 1]
        draw.rectangle(box, outline=(255, 220, 0), width=1)
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        draw.text(centre, str(number), fill="white", font=font, anchor="mm", stroke_width=2, stroke_fill="black")
    legend = [legend_line(number, feature) for number, feature in items[:LEGEND_LINES]]
    if len(items) > LEGEND_LINES:
        legend.append(f"... and {len(items) - LEGEND_LINES} more tiles: see the GeoJSON")
    files = ", ".join(path.name for path in scene.paths)
    footer = [line for line in (attribution, f"{files}: {len(items)} tiles captioned by CNNGemma") if line]
    sheet = Image.new(
        "RGB", (max(picture.width, 480), picture.height + 18 * (len(legend) + len(footer)) + 12), "white"
    )
    sheet.paste(picture, (0, 0))
    draw = ImageDraw.Draw(sheet)
    y = picture.height + 6
    for line in legend:
        draw.text((6, y), clip(line, draw, font, sheet.width - 12), fill="black", font=font)
        y += 18
    for line in footer:
        draw.text((6, y), clip(line, draw, small, sheet.width - 12), fill=(90, 90, 90), font=small)
        y += 18
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    partial = path.with_name(f".{path.name}.partial")
    sheet.save(partial, "PNG", pnginfo=info)
    partial.replace(path)
    return True


def legend_line(number: int, feature: dict) -> str:
    properties = feature["properties"]
    if properties["status"] != "captioned":
        return f"{number:>3}  ({properties['status']}: {properties['nodata_fraction']:.0%} invalid pixels)"
    return f"{number:>3}  {' '.join(properties['caption'].split())}"  # one line, whatever breaks the caption holds


def clip(text: str, draw: ImageDraw.ImageDraw, font, width: float) -> str:
    """`text` cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."

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
FONT, SMALL_FONT = ImageFont.load_default(size=14), ImageFont.load_default(size=12)


def preview_path(output: Path, index: int, scene: Scene) -> Path:
    return output.with_name(f"{output.stem}-preview-{index}-{scene.paths[0].stem}.png")


def is_own_preview(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            return image.info.get("Software") == SOFTWARE
    except OSError:
        return False


class Preview:
    """One scene's preview, drawn as its features arrive ((feature id, feature) pairs, in any number): the grid and
    numbers at once, the first LEGEND_LINES captions kept for the legend. `save()` writes it; a file at `path` that
    is not an earlier preview is kept, with a warning, and nothing is drawn."""

    def __init__(self, scene: Scene, path: Path, attribution: str | None = None):
        self.scene, self.path, self.attribution = scene, path, attribution
        self.legend, self.count, self.picture = [], 0, None
        if path.exists() and not is_own_preview(path):
            print(
                f"warning: {path} exists and is not a preview written by caption.py: kept, no preview.",
                file=sys.stderr,
            )
            return
        self.picture = scene.open().overview(PREVIEW_SIDE)
        self.scale = self.picture.width / scene.width
        self.draw = ImageDraw.Draw(self.picture)

    def add(self, number: int, feature: dict):
        if self.picture is None:
            return
        col, row, width, height = feature["properties"]["window"]
        box = [col * self.scale, row * self.scale, (col + width) * self.scale - 1, (row + height) * self.scale - 1]
        self.draw.rectangle(box, outline=(255, 220, 0), width=1)
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        self.draw.text(centre, str(number), fill="white", font=FONT, anchor="mm", stroke_width=2, stroke_fill="black")
        if len(self.legend) < LEGEND_LINES:
            self.legend.append(legend_line(number, feature))
        self.count += 1

    def save(self) -> bool:
        """Writes the PNG (atomically); returns whether it was written."""
        if self.picture is None:
            return False
        legend = self.legend + (
            [f"... and {self.count - LEGEND_LINES} more tiles: see the GeoJSON"] if self.count > LEGEND_LINES else []
        )
        files = ", ".join(path.name for path in self.scene.paths)
        footer = [line for line in (self.attribution, f"{files}: {self.count} tiles captioned by CNNGemma") if line]
        width, height = self.picture.size
        sheet = Image.new("RGB", (max(width, 480), height + 18 * (len(legend) + len(footer)) + 12), "white")
        sheet.paste(self.picture, (0, 0))
        draw = ImageDraw.Draw(sheet)
        y = height + 6
        for line in legend:
            draw.text((6, y), clip(line, draw, FONT, sheet.width - 12), fill="black", font=FONT)
            y += 18
        for line in footer:
            draw.text((6, y), clip(line, draw, SMALL_FONT, sheet.width - 12), fill=(90, 90, 90), font=SMALL_FONT)
            y += 18
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", SOFTWARE)
        partial = self.path.with_name(f".{self.path.name}.partial")
        sheet.save(partial, "PNG", pnginfo=info)
        partial.replace(self.path)
        return True


def render_preview(scene: Scene, items, path: Path, attribution: str | None = None) -> bool:
    """The preview of `scene` with its features `items` ((feature id, feature) pairs) written to `path`."""
    preview = Preview(scene, path, attribution)
    for number, feature in items:
        preview.add(number, feature)
    return preview.save()


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

"""`synth`: a synthetic aerial caption set in RISCM's raw layout, for offline demos and tests.

Each image is one of 12 scene kinds drawn from RISCM's classes; its 5 captions state what is drawn (count, colour,
position, orientation) in varied template wording, with RISCM-like duplicate captions (case and white-space
variants) inserted. The output is a function of the seed: image i uses its own generator seeded with (seed, i).
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from cnngemma.outputs import replace_folder

from .tables import write_csv

COLOURS = {
    "red": (205, 40, 35),
    "blue": (35, 85, 210),
    "white": (240, 240, 240),
    "yellow": (240, 205, 30),
    "black": (25, 25, 28),
    "orange": (235, 125, 25),
    "green": (45, 150, 55),
    "grey": (140, 140, 145),
    "brown": (125, 85, 45),
}
NUMBERS = ("one", "two", "three", "four", "five", "six")
POSITIONS = {  # region centre (x, y) as a fraction of the side, and its phrase
    "top left": ((0.27, 0.27), "in the top left corner"),
    "top": ((0.5, 0.25), "at the top"),
    "top right": ((0.73, 0.27), "in the top right corner"),
    "left": ((0.25, 0.5), "on the left"),
    "centre": ((0.5, 0.5), "in the centre"),
    "right": ((0.75, 0.5), "on the right"),
    "bottom left": ((0.27, 0.73), "in the bottom left corner"),
    "bottom": ((0.5, 0.75), "at the bottom"),
    "bottom right": ((0.73, 0.73), "in the bottom right corner"),
}
TOOL = "dataset_builder synth"  # the name in the output's record
_LAYOUT = re.compile(r"stats\.json|captions\.csv|resized/SYN_\d{5}\.jpg")  # an earlier version's files
REGION_HALF = 0.23  # objects are placed in a box of side 2 * REGION_HALF around the region centre
SUPERSAMPLE = 2  # draw at twice the size and downsample: smooth edges at no cost in code

# Counted objects: noun, plural, verb, colours, base length (fraction of the side), oriented?, scene, background.
COUNTED = {
    "airport": dict(
        noun="plane",
        verb="parked",
        colours=("white", "red", "blue", "yellow"),
        length=0.19,
        oriented=True,
        place="airport",
    ),
    "harbour": dict(
        noun="ship",
        verb="moored",
        colours=("white", "red", "yellow", "orange"),
        length=0.19,
        oriented=True,
        place="harbour",
    ),
    "parking lot": dict(
        noun="car",
        verb="parked",
        colours=("red", "blue", "white", "yellow"),
        length=0.11,
        oriented=True,
        place="parking lot",
    ),
    "storage tanks": dict(
        noun="storage tank",
        verb="standing",
        colours=("white", "blue", "red", "green"),
        length=0.12,
        oriented=False,
        place="industrial area",
    ),
    "sparse residential": dict(
        noun="house",
        verb="standing",
        colours=("red", "blue", "orange", "white"),
        length=0.12,
        oriented=False,
        place="residential area",
    ),
    "beach": dict(
        noun="umbrella",
        verb="standing",
        colours=("red", "blue", "green", "orange"),
        length=0.1,
        oriented=False,
        place="beach",
    ),
}
SCENES = (*COUNTED, "dense residential", "farmland", "forest", "river", "bridge", "desert", "ground track field")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _noise(rng: np.random.Generator, size: int, cells=(4, 12, 40), weights=(0.5, 0.3, 0.2)) -> np.ndarray:
    """Fractal value noise in [0, 1]: a few octaves of bilinearly upsampled random grids."""
    out = np.zeros((size, size), np.float32)
    for cell, weight in zip(cells, weights, strict=True):
        grid = Image.fromarray(rng.random((cell, cell), dtype=np.float32), "F")
        out += weight * np.asarray(grid.resize((size, size), Image.Resampling.BILINEAR))
    return out


def _texture(rng, size: int, colour, amplitude: float = 40.0) -> np.ndarray:
    base = np.asarray(colour, np.float32) + rng.normal(0, 8, 3).astype(np.float32)
    return base + (_noise(rng, size)[:, :, None] - 0.5) * amplitude * 2


def _to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")


def _rotate(points, angle: float, cx: float, cy: float):
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _shade(colour, factor: float):
    return tuple(int(max(0, min(255, c * factor))) for c in colour)


def _draw_object(draw: ImageDraw.ImageDraw, kind: str, cx, cy, length, angle, colour, shadow=True):
    """Draw one counted object centred at (cx, cy); `length` in pixels along its axis, `angle` in radians."""
    L = length
    offset = 0.07 * L
    if kind == "plane":
        parts = [
            [(-0.5, -0.05), (0.45, -0.05), (0.5, 0), (0.45, 0.05), (-0.5, 0.05)],
            [(0.12, 0), (-0.12, -0.48), (-0.22, -0.48), (-0.08, 0), (-0.22, 0.48), (-0.12, 0.48)],
            [(-0.38, 0), (-0.46, -0.18), (-0.52, -0.18), (-0.48, 0), (-0.52, 0.18), (-0.46, 0.18)],
        ]
    elif kind == "ship":
        parts = [[(-0.5, -0.12), (0.3, -0.12), (0.5, 0), (0.3, 0.12), (-0.5, 0.12)]]
    elif kind == "car":
        parts = [[(-0.5, -0.22), (0.5, -0.22), (0.5, 0.22), (-0.5, 0.22)]]
    elif kind == "house":
        parts = [[(-0.5, -0.36), (0.5, -0.36), (0.5, 0.36), (-0.5, 0.36)]]
    else:  # round objects: storage tank, umbrella
        r = L / 2
        if shadow:
            draw.ellipse((cx - r + offset, cy - r + offset, cx + r + offset, cy + r + offset), fill=(35, 35, 35))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        if kind == "storage tank":
            draw.ellipse((cx - 0.72 * r, cy - 0.72 * r, cx + 0.72 * r, cy + 0.72 * r), fill=_shade(colour, 0.85))
            draw.ellipse((cx - 0.12 * r, cy - 0.12 * r, cx + 0.12 * r, cy + 0.12 * r), fill=_shade(colour, 0.6))
        else:
            for start in range(0, 360, 90):
                draw.pieslice(
                    (cx - r, cy - r, cx + r, cy + r),
                    start + angle * 57.3,
                    start + 45 + angle * 57.3,
                    fill=(245, 245, 245),
                )
        return
    scaled = [[(x * L, y * L) for x, y in part] for part in parts]
    if shadow:
        for part in scaled:
            draw.polygon(_rotate(part, angle, cx + offset, cy + offset), fill=(35, 35, 35))
    for part in scaled:
        draw.polygon(_rotate(part, angle, cx, cy), fill=colour)
    if kind == "ship":
        cabin = [(-0.42 * L, -0.07 * L), (-0.1 * L, -0.07 * L), (-0.1 * L, 0.07 * L), (-0.42 * L, 0.07 * L)]
        draw.polygon(_rotate(cabin, angle, cx, cy), fill=_shade(colour, 0.7) if colour[0] > 128 else (200, 200, 200))
    elif kind == "car":
        glass = [(0.12 * L, -0.18 * L), (0.3 * L, -0.18 * L), (0.3 * L, 0.18 * L), (0.12 * L, 0.18 * L)]
        draw.polygon(_rotate(glass, angle, cx, cy), fill=(40, 50, 60))
    elif kind == "house":
        draw.line(
            _rotate([(-0.5 * L, 0), (0.5 * L, 0)], angle, cx, cy),
            fill=_shade(colour, 0.6),
            width=max(1, int(0.06 * L)),
        )


def _grid_points(rng, count: int, centre, half: float, wide: bool):
    """Centres of `count` objects on a jittered grid inside a square region; wide grids for horizontal objects."""
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    if not wide:
        cols, rows = rows, cols
    cells = rng.permutation(cols * rows)[:count]
    cw, ch = 2 * half / cols, 2 * half / rows
    points = []
    for cell in sorted(cells):
        col, row = cell % cols, cell // cols
        x = centre[0] - half + (col + 0.5) * cw + rng.uniform(-0.1, 0.1) * cw
        y = centre[1] - half + (row + 0.5) * ch + rng.uniform(-0.1, 0.1) * ch
        points.append((x, y))
    return points, min(cw, ch), max(cw, ch)


def _outside(box, x, y, margin=0.04):
    return not (box[0] - margin < x < box[2] + margin and box[1] - margin < y < box[3] + margin)


def _trees(draw, rng, side, count, avoid=None, colour=(30, 95, 40), radius=(0.018, 0.03)):
    """Distractors: small dark-green tree crowns, kept out of the `avoid` box (fractions of the side)."""
    for _ in range(count):
        x, y = rng.uniform(0.03, 0.97, 2)
        if avoid is not None and not _outside(avoid, x, y):
            continue
        r = rng.uniform(*radius) * side
        draw.ellipse(
            (x * side - r, y * side - r, x * side + r, y * side + r), fill=_shade(colour, rng.uniform(0.8, 1.2))
        )


def _counted_scene(rng, scene: str, side: int):
    spec = COUNTED[scene]
    noun = spec["noun"]
    count = int(rng.integers(1, 7))
    colour = str(rng.choice(spec["colours"]))
    sea = None
    positions = list(POSITIONS)
    if scene == "beach":
        sea = str(rng.choice(("left", "right", "top", "bottom")))
        blocked = {"left": "left", "right": "right", "top": "top", "bottom": "bottom"}[sea]
        positions = [p for p in positions if blocked not in p.split()]
    position = str(rng.choice(positions))
    orientation = str(rng.choice(("horizontal", "vertical"))) if spec["oriented"] else None
    backgrounds = {
        "airport": (120, 120, 118),
        "harbour": (40, 85, 125),
        "parking lot": (85, 85, 88),
        "storage tanks": (170, 160, 140),
        "sparse residential": (85, 135, 60),
        "beach": (220, 200, 150),
    }
    array = _texture(rng, side, backgrounds[scene], 18 if scene != "sparse residential" else 30)
    if sea is not None:  # the sea takes the band on one side, with a foam line
        band = int(side * rng.uniform(0.24, 0.3))
        water = _texture(rng, side, (35, 100, 150), 20)
        sl = {
            "left": np.s_[:, :band],
            "right": np.s_[:, side - band :],
            "top": np.s_[:band, :],
            "bottom": np.s_[side - band :, :],
        }[sea]
        array[sl] = water[sl]
    image = _to_image(array)
    draw = ImageDraw.Draw(image)
    centre, _ = POSITIONS[position]
    box = (centre[0] - REGION_HALF, centre[1] - REGION_HALF, centre[0] + REGION_HALF, centre[1] + REGION_HALF)
    if scene == "airport":  # runway along an edge away from the planes, grass patches
        vertical = rng.random() < 0.5
        edge = 0.9 if (centre[0] if vertical else centre[1]) < 0.5 else 0.1
        a, b = (edge - 0.06) * side, (edge + 0.06) * side
        draw.rectangle((a, 0, b, side) if vertical else (0, a, side, b), fill=(70, 70, 72))
        for t in np.arange(0.05, 1, 0.12):
            m = edge * side
            draw.rectangle(
                (m - 2, t * side, m + 2, (t + 0.05) * side)
                if vertical
                else (t * side, m - 2, (t + 0.05) * side, m + 2),
                fill=(230, 230, 230),
            )
        _trees(draw, rng, side, 10, box, colour=(70, 120, 50), radius=(0.03, 0.05))
    elif scene == "harbour":  # a pier and a few buoys
        y = (0.06 if centre[1] > 0.5 else 0.94) * side
        draw.rectangle((0, y - 0.05 * side, side, y + 0.05 * side), fill=(160, 155, 150))
        for _ in range(4):
            x, yy = rng.uniform(0.05, 0.95, 2)
            if _outside(box, x, yy):
                draw.ellipse((x * side - 3, yy * side - 3, x * side + 3, yy * side + 3), fill=(240, 110, 20))
    elif scene == "parking lot":  # painted bay lines, trees at the edge
        step = 0.08 * side
        for k in range(int(side / step) + 1):
            if orientation == "horizontal":
                draw.line((0, k * step, side, k * step), fill=(200, 200, 200), width=2)
            else:
                draw.line((k * step, 0, k * step, side), fill=(200, 200, 200), width=2)
        _trees(draw, rng, side, 8, box)
    elif scene == "storage tanks":  # low grey buildings as distractors
        for _ in range(3):
            x, y = rng.uniform(0.08, 0.92, 2)
            if _outside(box, x, y, 0.08):
                w, h = rng.uniform(0.05, 0.1, 2) * side
                draw.rectangle((x * side - w, y * side - h, x * side + w, y * side + h), fill=(105, 105, 110))
    elif scene == "sparse residential":  # a road and trees
        road = rng.uniform(0.05, 0.12) * side if centre[1] > 0.5 else rng.uniform(0.88, 0.95) * side
        draw.rectangle((0, road - 0.03 * side, side, road + 0.03 * side), fill=(110, 110, 110))
        _trees(draw, rng, side, 14, box)
    elif scene == "beach":
        _trees(draw, rng, side, 3, box, colour=(60, 120, 60))
    points, short, long = _grid_points(rng, count, centre, REGION_HALF, orientation != "vertical")
    scale = rng.uniform(0.85, 1.1)
    length = min(spec["length"] * scale, 0.92 * (long if spec["oriented"] else short)) * side
    if spec["oriented"]:
        length = min(length, 2.2 * short * side)
    base = 0.0 if orientation != "vertical" else math.pi / 2
    for x, y in points:
        angle = base + rng.normal(0, 0.12) + (math.pi if rng.random() < 0.5 else 0)
        _draw_object(draw, noun, x * side, y * side, length, angle, COLOURS[colour])
    facts = dict(
        scene=scene,
        place=spec["place"],
        noun=noun,
        count=count,
        colour=colour,
        position=position,
        orientation=orientation,
        sea=sea,
        verb=spec["verb"],
    )
    return image, facts


def _counted_captions(facts: dict) -> list[str]:
    n = facts["count"]
    noun = facts["noun"] if n == 1 else ("storage tanks" if facts["noun"] == "storage tank" else facts["noun"] + "s")
    be = "is" if n == 1 else "are"
    number, colour, place = NUMBERS[n - 1], facts["colour"], facts["place"]
    pp = POSITIONS[facts["position"]][1]
    sea_side = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
    extra = f" next to the sea {sea_side[facts['sea']]}" if facts["sea"] else ""
    article = "an" if place[0] in "aeiou" else "a"
    templates = [
        f"there {be} {number} {colour} {noun} {pp} of the {place}{extra} .",
        f"{number} {colour} {noun} {be} {facts['verb']} {pp} of the {place}{extra} .",
        f"the {place} has {number} {colour} {noun} {pp}{extra} .",
        f"{article} {place} with {number} {colour} {noun} {pp}{extra} .",
        f"{pp} of the {place}{extra} there {be} {number} {colour} {noun} .",
    ]
    if facts["orientation"]:
        orient = facts["orientation"]
        templates += [
            f"{number} {colour} {noun} {be} {facts['verb']} {orient}ly {pp} of the {place} .",
            f"there {be} {number} {orient} {colour} {noun} {pp} of the {place} .",
        ]
    return templates


def _background_scene(rng, scene: str, side: int):
    """The scenes without counted objects: their facts are colours, orientations, counts of strips or bridges."""
    draw_image = None
    facts = dict(scene=scene)
    if scene == "dense residential":
        colour = str(rng.choice(("red", "grey", "blue", "orange")))
        orientation = str(rng.choice(("horizontal", "vertical")))
        image = _to_image(_texture(rng, side, (150, 150, 140), 15))
        draw = ImageDraw.Draw(image)
        step = 0.09 * side
        road = rng.uniform(0.35, 0.65) * side
        for i in range(12):
            for j in range(12):
                x, y = (i + 0.5) * step, (j + 0.5) * step
                along = y if orientation == "horizontal" else x
                if abs(along - road) < 0.08 * side:
                    continue
                w, h = 0.36 * step * rng.uniform(0.8, 1.1), 0.32 * step * rng.uniform(0.8, 1.1)
                draw.rectangle((x - w, y - h, x + w, y + h), fill=_shade(COLOURS[colour], rng.uniform(0.8, 1.1)))
        band = (0, road - 0.045 * side, side, road + 0.045 * side)
        draw.rectangle(band if orientation == "horizontal" else (band[1], 0, band[3], side), fill=(90, 90, 92))
        facts.update(colour=colour, orientation=orientation)
        templates = [
            f"a dense residential area with many {colour} houses and a {orientation} road .",
            f"many {colour} houses are densely arranged on both sides of a {orientation} road .",
            f"a {orientation} road runs through a dense residential area with {colour} roofs .",
            f"this is a dense residential area with {colour} houses and a {orientation} road .",
            f"lots of {colour} houses stand close together beside a {orientation} road .",
        ]
        draw_image = image
    elif scene == "farmland":
        strips = int(rng.integers(2, 7))
        pair = [("green", "yellow"), ("green", "brown")][int(rng.integers(2))]
        orientation = str(rng.choice(("horizontal", "vertical")))
        image = Image.new("RGB", (side, side))
        draw = ImageDraw.Draw(image)
        edges = np.linspace(0, side, strips + 1)
        for k in range(strips):
            colour = COLOURS[pair[k % 2]]
            tex = _to_image(_texture(rng, side, _shade(colour, 0.85), 18))
            box = (
                (0, int(edges[k]), side, int(edges[k + 1]))
                if orientation == "horizontal"
                else (int(edges[k]), 0, int(edges[k + 1]), side)
            )
            image.paste(tex.crop(box), box[:2])
            if k:
                line = (0, edges[k], side, edges[k]) if orientation == "horizontal" else (edges[k], 0, edges[k], side)
                draw.line(line, fill=(90, 70, 45), width=3)
        number, (a, b) = NUMBERS[strips - 1], pair
        facts.update(count=strips, colours=pair, orientation=orientation)
        templates = [
            f"farmland with {number} {orientation} strips of {a} and {b} crops .",
            f"{number} {orientation} fields of {a} and {b} crops lie side by side .",
            f"the farmland is divided into {number} {orientation} strips of {a} and {b} .",
            f"there are {number} {orientation} strips of farmland in {a} and {b} .",
            f"{a} and {b} crops grow in {number} {orientation} strips of farmland .",
        ]
        draw_image = image
    elif scene == "forest":
        colour = str(rng.choice(("green", "orange")))
        position = str(rng.choice(list(POSITIONS)))
        base = (40, 100, 45) if colour == "green" else (180, 100, 35)
        image = _to_image(_texture(rng, side, _shade(base, 0.7), 20))
        draw = ImageDraw.Draw(image)
        for _ in range(260):
            x, y = rng.uniform(0, 1, 2) * side
            r = rng.uniform(0.02, 0.035) * side
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_shade(base, rng.uniform(0.75, 1.25)))
        (cx, cy), pp = POSITIONS[position]
        r = 0.15 * side
        draw.ellipse((cx * side - r, cy * side - 0.8 * r, cx * side + r, cy * side + 0.8 * r), fill=(40, 90, 140))
        facts.update(colour=colour, position=position)
        templates = [
            f"a dense {colour} forest with a small lake {pp} .",
            f"there is a small lake {pp} of the {colour} forest .",
            f"many {colour} trees surround a small lake {pp} .",
            f"a small lake lies {pp} of a dense {colour} forest .",
            f"the {colour} forest is dense and has a small lake {pp} .",
        ]
        draw_image = image
    elif scene in ("river", "bridge"):
        colour = str(rng.choice(("blue", "brown"))) if scene == "river" else "blue"
        orientation = str(rng.choice(("horizontal", "vertical")))
        image = _to_image(_texture(rng, side, (80, 140, 60), 30))
        draw = ImageDraw.Draw(image)
        water = (45, 95, 150) if colour == "blue" else (130, 100, 60)
        width = rng.uniform(0.16, 0.22) * side
        phase, amp, mid = rng.uniform(0, 6.3), rng.uniform(0.02, 0.05) * side, rng.uniform(0.4, 0.6) * side
        for t in range(0, side + 4, 4):
            c = mid + amp * math.sin(t / side * 6.3 + phase)
            box = (
                (t - 4, c - width / 2, t + 4, c + width / 2)
                if orientation == "horizontal"
                else (c - width / 2, t - 4, c + width / 2, t + 4)
            )
            draw.rectangle(box, fill=water)
        _trees(draw, rng, side, 25, None)
        if scene == "river":
            facts.update(colour=colour, orientation=orientation)
            direction = f"{orientation}ly"
            templates = [
                f"a {colour} river runs {direction} through green fields .",
                f"a {colour} river flows {direction} across the green land .",
                f"there is a {orientation} {colour} river between green fields .",
                f"green fields lie on both sides of a {colour} river that runs {direction} .",
                f"a winding {colour} river crosses the image {direction} .",
            ]
        else:
            count = int(rng.integers(1, 4))
            bcolour = str(rng.choice(("white", "grey", "red")))
            for k in range(count):
                t = (k + 1) / (count + 1) * side + rng.uniform(-0.04, 0.04) * side
                c = mid + amp * math.sin(t / side * 6.3 + phase)
                half = width / 2 + 0.07 * side
                box = (
                    (t - 0.03 * side, c - half, t + 0.03 * side, c + half)
                    if orientation == "horizontal"
                    else (c - half, t - 0.03 * side, c + half, t + 0.03 * side)
                )
                draw.rectangle(box, fill=COLOURS[bcolour], outline=(60, 60, 60))
            number = NUMBERS[count - 1]
            noun, be = ("bridge", "is") if count == 1 else ("bridges", "are")
            facts.update(count=count, colour=bcolour, orientation=orientation)
            templates = [
                f"there {be} {number} {bcolour} {noun} over a {orientation} river .",
                f"{number} {bcolour} {noun} {'crosses' if count == 1 else 'cross'} a river that runs "
                f"{orientation}ly .",
                f"a {orientation} river with {number} {bcolour} {noun} over it .",
                f"{number} {bcolour} {noun} {be} built across the {orientation} river .",
                f"the {orientation} river is crossed by {number} {bcolour} {noun} .",
            ]
        draw_image = image
    elif scene == "desert":
        colour = str(rng.choice(("yellow", "orange")))
        orientation = str(rng.choice(("horizontal", "vertical")))
        base = np.asarray((215, 185, 110) if colour == "yellow" else (200, 120, 60), np.float32)
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
        along = yy if orientation == "horizontal" else xx
        across = xx if orientation == "horizontal" else yy
        waves = np.sin(along / side * rng.uniform(30, 45) + 3 * np.sin(across / side * rng.uniform(4, 8)))
        array = base + waves[:, :, None] * 28 + (_noise(rng, side)[:, :, None] - 0.5) * 30
        draw_image = _to_image(array)
        facts.update(colour=colour, orientation=orientation)
        templates = [
            f"a {colour} desert with {orientation} sand dunes .",
            f"{orientation} sand dunes cover the {colour} desert .",
            f"this is a bare {colour} desert with {orientation} dunes .",
            f"many {orientation} ripples of {colour} sand in the desert .",
            f"the desert is {colour} and its dunes are {orientation} .",
        ]
    else:  # ground track field
        colour = str(rng.choice(("red", "blue")))
        position = str(rng.choice(("left", "centre", "right")))
        image = _to_image(_texture(rng, side, (150, 150, 140), 20))
        draw = ImageDraw.Draw(image)
        _trees(draw, rng, side, 20, None)
        (cx, cy), pp = POSITIONS[position]
        cx, cy = cx * side, cy * side
        w, h = 0.21 * side, 0.38 * side
        draw.rounded_rectangle((cx - w, cy - h, cx + w, cy + h), radius=w, fill=COLOURS[colour])
        draw.rounded_rectangle(
            (cx - 0.62 * w, cy - 0.75 * h, cx + 0.62 * w, cy + 0.75 * h),
            radius=0.62 * w,
            fill=(60, 150, 60),
            outline=(240, 240, 240),
            width=2,
        )
        facts.update(colour=colour, position=position)
        templates = [
            f"a {colour} running track around a green football field {pp} .",
            f"there is a ground track field with a {colour} track {pp} .",
            f"a green football field inside a {colour} running track lies {pp} .",
            f"{pp} there is a playground with a {colour} track .",
            f"a {colour} oval track surrounds a green field {pp} .",
        ]
        draw_image = image
    return draw_image, facts, templates


def _variant(caption: str, rng) -> str:
    """A duplicate as RISCM has them: equal after strip().lower() but not byte-equal."""
    kinds = (str.lower, str.upper, lambda c: c + " ", lambda c: "  " + c, lambda c: c.capitalize() + "  ")
    variant = kinds[int(rng.integers(len(kinds)))](caption)
    return variant if variant != caption else caption + " "


def make_example(seed: int, index: int, size: int = 224) -> tuple[Image.Image, list[str], dict]:
    """Image `index` of the set with seed `seed`: the picture, its 5 raw captions and the facts behind them."""
    rng = np.random.default_rng([seed, index])
    scene = SCENES[int(rng.integers(len(SCENES)))]
    side = size * SUPERSAMPLE
    if scene in COUNTED:
        image, facts = _counted_scene(rng, scene, side)
        templates = _counted_captions(facts)
    else:
        image, facts, templates = _background_scene(rng, scene, side)
    image = image.resize((size, size), Image.Resampling.BOX)
    # Lighting: global gain and a soft linear gradient in a random direction.
    array = np.asarray(image, np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gradient = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
    array = array * rng.uniform(0.8, 1.15) * (1 + 0.12 * gradient[:, :, None])
    image = _to_image(array)

    if facts.get("orientation") and scene in COUNTED:
        chosen = [templates[5]] + [templates[i] for i in rng.permutation([0, 1, 2, 3, 4, 6])[:4]]
        order = rng.permutation(5)
        chosen = [chosen[i] for i in order]
    else:
        chosen = [templates[i] for i in rng.permutation(len(templates))[:5]]
    captions = [_cap(text) for text in chosen]
    if rng.random() < 0.3:  # RISCM-like duplicates: a later caption repeats an earlier one up to case/space
        later = int(rng.integers(1, 5))
        captions[later] = _variant(captions[int(rng.integers(0, later))], rng)
        if rng.random() < 0.25:
            captions[4] = _variant(captions[int(rng.integers(0, 4))], rng)
    if rng.random() < 0.01:
        captions[int(rng.integers(1, 5))] = " "
    return image, captions, facts


def _split_of(rng_value: float) -> str:
    return "train" if rng_value < 0.8 else "val" if rng_value < 0.9 else "test"


def write_grid(examples, path: str | Path, cell: int = 224, columns: int = 4) -> None:
    """A grid of images, each with its first caption written under it."""
    font = ImageFont.load_default(size=13)
    text_height = 66
    rows = math.ceil(len(examples) / columns)
    sheet = Image.new("RGB", (columns * (cell + 8) + 8, rows * (cell + text_height + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (image, caption) in enumerate(examples):
        x = 8 + (k % columns) * (cell + 8)
        y = 8 + (k // columns) * (cell + text_height + 8)
        sheet.paste(image.resize((cell, cell)), (x, y))
        draw.multiline_text(
            (x, y + cell + 3), "\n".join(textwrap.wrap(caption, cell // 7)[:4]), fill=(0, 0, 0), font=font
        )
    sheet.save(path)


def synth_layout(folder: Path) -> list[str] | None:
    """The files an earlier version of `synth` wrote in `folder` (no record), or None if it is no synth output: one has
    captions.csv, resized/ and a stats.json with exactly the keys images, seed, size, splits, scenes."""
    try:
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = set(stats) if isinstance(stats, dict) else set()
    if keys != {"images", "seed", "size", "splits", "scenes"} or not (folder / "captions.csv").is_file():
        return None
    if not (folder / "resized").is_dir():
        return None
    names = (path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir())
    return [name for name in names if _LAYOUT.fullmatch(name)]


def synthesize(
    output: str | Path, num_images: int = 2000, seed: int = 0, size: int = 224, grid: str | Path | None = None
) -> dict:
    """Write `output/captions.csv` (RISCM raw layout) and `output/resized/SYN_#####.jpg`, new first (an existing
    `output` is replaced only when it is an earlier synth output; see `cnngemma.outputs`)."""
    if num_images < 1:
        raise ValueError(f"--num-images {num_images}: expected at least 1.")
    if size < 32:
        raise ValueError(f"--size {size}: expected at least 32 pixels, so that objects stay visible.")
    split_rng = np.random.default_rng([seed, 2**31])
    splits = [_split_of(value) for value in split_rng.random(num_images)]
    rows, scenes, examples, seen = [], {}, [], set()
    with replace_folder(output, TOOL, legacy=synth_layout, flag="--output") as work:
        (work / "resized").mkdir()
        for index in tqdm(range(num_images), desc="synthesising", unit="img", mininterval=1.0):
            image, captions, facts = make_example(seed, index, size)
            name = f"SYN_{index:05d}.jpg"
            image.save(work / "resized" / name, "JPEG", quality=90)
            rows.append(["SYNTH", splits[index], name, *captions])
            scenes[facts["scene"]] = scenes.get(facts["scene"], 0) + 1
            if grid is not None and len(examples) < 16 and (facts["scene"] not in seen or len(seen) == len(SCENES)):
                seen.add(facts["scene"])  # one of each scene kind first, then the next ones
                examples.append((image, captions[0].strip()))
        write_csv(work / "captions.csv", [["source", "split", "image", *(f"caption_{n}" for n in range(1, 6))], *rows])
        summary = {
            "images": num_images,
            "seed": seed,
            "size": size,
            "splits": {name: splits.count(name) for name in ("train", "val", "test")},
            "scenes": dict(sorted(scenes.items())),
        }
        (work / "stats.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if grid is not None:
        write_grid(examples, grid)
    return summary

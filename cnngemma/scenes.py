"""Whole raster scenes (GeoTIFF, COG, JPEG 2000, anything rasterio opens) cut into model-sized tiles: windowed reads,
one stretch per scene, masks for no-data, and each tile's footprint in WGS 84 as an RFC 7946 polygon."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from pyproj import CRS, Geod, Transformer
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from modeling_cnngemma.image_processing_cnngemma import invalid_values

from .errors import UsageError, first_line

# Files a folder listing takes as scenes (a single file given by name may be anything rasterio opens).
RASTER_SUFFIXES = {".tif", ".tiff", ".jp2", ".j2k", ".jpx", ".vrt", ".img"}
# Ground metres per model pixel in the training data (the synthetic and RISCM chips): outside, captions are guesses.
TRAINING_METRES_PER_PIXEL = (0.5, 30.0)
# The stretch is taken from a read of at most this many pixels on the longer side (an overview where one exists).
STRETCH_SAMPLE_SIDE = 1024
WGS84 = Geod(ellps="WGS84")


@dataclass(frozen=True)
class TileSettings:
    """How scenes are cut and shown to the model; every field goes into the hash that guards resumed runs."""

    tile: int  # tile side in scene pixels
    overlap: int = 0  # pixels shared by neighbouring tiles
    bands: tuple[str, ...] | None = None  # 1-based band numbers or band names, shown as R, G, B
    stretch: tuple[float, float] | None = None  # fixed LOW,HIGH instead of the scene's 2-98 percentiles
    max_nodata: float = 0.5  # tiles with a larger share of invalid pixels are not captioned
    nodata: float | None = None  # a no-data value for files that declare none


def offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis, `tile - overlap` apart. The last tile is shifted inward to end at the edge (it
    overlaps its neighbour more) instead of being padded with black, which the model never saw in training."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def counter_clockwise(ring: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The ring in RFC 7946's winding order (exterior rings counter-clockwise), by the sign of its shoelace area."""
    area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1]))
    return ring if area >= 0 else ring[::-1]


def antimeridian_split(shifted: list[tuple[float, float]]) -> dict:
    """A footprint that crosses longitude 180 as a MultiPolygon of its two sides (RFC 7946, section 3.1.9).
    `shifted` is open and counter-clockwise, with the western longitudes moved past 180 (-179 -> 181)."""
    parts = []
    for keep, offset in ((lambda lon: lon <= 180, 0.0), (lambda lon: lon >= 180, -360.0)):
        part = []
        for (x0, y0), (x1, y1) in zip(shifted, shifted[1:] + shifted[:1]):  # Sutherland-Hodgman against lon 180
            if keep(x0):
                part.append((x0 + offset, y0))
            if keep(x0) != keep(x1) and x0 != x1:
                part.append((180.0 + offset, y0 + (y1 - y0) * (180 - x0) / (x1 - x0)))
        if len(part) >= 3:
            parts.append([list(point) for point in part + part[:1]])
    return {"type": "MultiPolygon", "coordinates": [[part] for part in parts]}


class Scene:
    """One scene: a raster file, or single-band files of one grid stacked as bands (`--stack`). It reads windows
    only; `open()` before reading, `close()` after."""

    def __init__(self, paths: list[Path], settings: TileSettings):
        self.paths, self.settings = [Path(path) for path in paths], settings
        self.name = ",".join(map(str, self.paths))
        self.datasets = []
        self.limits = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self.open()
            try:
                self._describe()
            finally:
                self.close()

    def open(self) -> Scene:
        if not self.datasets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                try:
                    for path in self.paths:
                        self.datasets.append(rasterio.open(path))
                except RasterioIOError as error:
                    self.close()
                    raise OSError(f"{path}: rasterio cannot open it ({first_line(error)})") from None
        return self

    def close(self):
        for dataset in self.datasets:
            dataset.close()
        self.datasets = []

    def _describe(self):
        first = self.datasets[0]
        self.width, self.height, self.transform, self.crs = first.width, first.height, first.transform, first.crs
        if len(self.datasets) > 1 and (
            several := [(p, d.count) for p, d in zip(self.paths, self.datasets) if d.count > 1]
        ):
            raise UsageError(
                f"--stack {self.name}: {several[0][0]} has {several[0][1]} bands; expected single-band files, one per "
                "band. Pass a multi-band file as an input of its own (with --bands), not in --stack."
            )
        for path, dataset in zip(self.paths[1:], self.datasets[1:]):
            theirs = (dataset.width, dataset.height, dataset.crs, dataset.transform)
            if theirs != (self.width, self.height, self.crs, self.transform):
                raise UsageError(
                    f"--stack {self.name}: {path} is on another grid ({grid(dataset)}) than {self.paths[0]} "
                    f"({grid(first)}). Expected bands of one grid; resample them to one grid first (e.g. gdalwarp "
                    "-tr), or stack matching bands."
                )
        # band sources: (dataset index, 1-based band) for every band the scene offers, with its name
        if len(self.datasets) > 1:
            sources = [(i, 1) for i in range(len(self.datasets))]
            names = [path.stem for path in self.paths]
        else:
            sources = [(0, band) for band in first.indexes]
            names = [description or "" for description in first.descriptions]
        alpha = [
            self.datasets[i].colorinterp[band - 1] == ColorInterp.alpha if len(self.datasets) == 1 else False
            for i, band in sources
        ]
        self.dtype = np.dtype(first.dtypes[0])
        self.shown = self._pick_bands(sources, names, alpha)
        self.band_names = [names[sources.index(source)] or f"band {source[1]}" for source in self.shown]
        self.georeferenced = self.crs is not None and not self.transform.is_identity

    def _pick_bands(self, sources, names, alpha) -> list[tuple[int, int]]:
        """The three (dataset, band) sources shown as R, G, B: `--bands` numbers or names, else the first three
        non-alpha bands; one band is shown as grey."""
        wanted = self.settings.bands
        if wanted is None:
            usable = [source for source, is_alpha in zip(sources, alpha) if not is_alpha] or sources
            return usable[:3] if len(usable) >= 3 else [usable[0]] * 3
        picked = []
        lowered = [name.lower() for name in names]
        for item in wanted:
            if item.isdigit() and 1 <= int(item) <= len(sources):
                picked.append(sources[int(item) - 1])
            elif item.lower() in lowered:
                picked.append(sources[lowered.index(item.lower())])
            else:
                offered = ", ".join(f"{i + 1}{f' ({name})' if name else ''}" for i, name in enumerate(names))
                raise UsageError(
                    f"--bands {','.join(wanted)}: {self.name} has no band {item!r}. Expected band numbers from 1 or "
                    f"band names; it has {offered}."
                )
        return picked if len(picked) == 3 else [picked[0]] * 3

    # reading

    def _read(self, window: Window | None = None, out_shape: tuple[int, int] | None = None, datasets=None):
        """The shown bands as (3, H, W) in the file's type, and a (H, W) mask of invalid pixels (None if none):
        no-data values, NaN, GDAL masks and alpha, and the user's no-data value. A pixel invalid in one shown band
        is invalid. Each file is read once for all its shown bands (JPEG 2000 decodes them together)."""
        kwargs = {"window": window}
        if out_shape is not None:
            kwargs |= {"out_shape": (1, *out_shape), "resampling": Resampling.nearest}  # exact values for the masks
        read, invalid = {}, None
        for dataset_index in dict.fromkeys(index for index, _ in self.shown):
            dataset = (datasets or self.datasets)[dataset_index]
            indexes = sorted({band for index, band in self.shown if index == dataset_index})
            if out_shape is not None:
                kwargs["out_shape"] = (len(indexes), *out_shape)
            data = dataset.read(indexes, **kwargs)
            for band, values in zip(indexes, data):
                read[dataset_index, band] = values
                flags = dataset.mask_flag_enums[band - 1]
                if MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:  # a GDAL mask band or an alpha band
                    hit = dataset.read_masks(band, **{**kwargs, "out_shape": data.shape[1:]}) == 0
                    invalid = hit if invalid is None else invalid | hit
                hit = invalid_values(values, (dataset.nodatavals[band - 1], self.settings.nodata))
                if hit is not None:
                    invalid = hit if invalid is None else invalid | hit
        return np.stack([read[source] for source in self.shown]), invalid

    def stretch_limits(self) -> tuple[np.ndarray, np.ndarray] | None:
        """One (low, high) per shown band for the whole scene, so that neighbouring tiles look alike: `--stretch`,
        else the 2-98 percentiles of the valid pixels of a decimated read (never a full read). None for 8-bit scenes,
        which are shown as they are, as in training.

        The sample is taken from full-resolution pixels, not from overviews: a JPEG 2000's resolution levels and a
        GeoTIFF's averaged overviews hold other values, and the same pixels must get the same stretch in any format."""
        if self.limits is not None or (self.settings.stretch is None and self.dtype == np.uint8):
            return self.limits
        if self.settings.stretch is not None:
            self.limits = tuple(np.full(3, value, np.float32) for value in self.settings.stretch)
            return self.limits
        step = max(1, math.ceil(max(self.width, self.height) / STRETCH_SAMPLE_SIDE))
        shape = (math.ceil(self.height / step), math.ceil(self.width / step))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            full_resolution = [rasterio.open(path, OVERVIEW_LEVEL="NONE") for path in self.paths]
        try:
            sample, invalid = self._read(out_shape=shape, datasets=full_resolution)
        finally:
            for dataset in full_resolution:
                dataset.close()
        values = sample.reshape(3, -1) if invalid is None else sample[:, ~invalid]
        if values.shape[1] == 0:
            self.limits = (np.zeros(3, np.float32), np.ones(3, np.float32))  # every tile is no-data anyway
        else:
            low, high = np.percentile(values.astype(np.float32), [2, 98], axis=1)
            self.limits = (low.astype(np.float32), high.astype(np.float32))
        return self.limits

    def tile_image(self, window: Window, size: int, resample) -> tuple[Image.Image | None, float]:
        """The window as the model's RGB input (stretched, invalid pixels black, resized to `size`), and its share of
        invalid pixels; no image when that share is above `max_nodata`."""
        data, invalid = self._read(window)
        fraction = float(invalid.mean()) if invalid is not None else 0.0
        if fraction > self.settings.max_nodata or fraction == 1.0:
            return None, fraction
        return self.to_image(data, invalid).resize((size, size), resample), fraction

    def to_image(self, data: np.ndarray, invalid: np.ndarray | None) -> Image.Image:
        """(3, H, W) pixels as 8-bit RGB with the scene's stretch; invalid pixels black."""
        limits = self.stretch_limits()
        if limits is not None:
            low, high = (limit[:, None, None] for limit in limits)
            data = data.astype(np.float32)
            if invalid is not None:
                data[:, invalid] = 0  # NaN would survive the clip
            data = (np.clip((data - low) / np.maximum(high - low, 1e-6), 0, 1) * 255 + 0.5).astype(np.uint8)
        if invalid is not None:
            data[:, invalid] = 0
        return Image.fromarray(np.ascontiguousarray(np.moveaxis(data, 0, -1)), "RGB")  # (3, H, W) -> (H, W, 3)

    def overview(self, side: int) -> Image.Image:
        """The whole scene, stretched, at most `side` pixels on its longer side (from an overview where the file
        has one): a picture for people, not model input."""
        step = max(1, math.ceil(max(self.width, self.height) / side))
        self.open()
        return self.to_image(*self._read(out_shape=(math.ceil(self.height / step), math.ceil(self.width / step))))

    # geometry

    def windows(self) -> list[Window]:
        """Every tile of the scene, row by row from the top left."""
        tile, overlap = self.settings.tile, self.settings.overlap
        return [
            Window(col, row, min(tile, self.width), min(tile, self.height))
            for row in offsets(self.height, tile, overlap)
            for col in offsets(self.width, tile, overlap)
        ]

    def to_wgs84(self) -> Transformer | None:
        if not self.georeferenced:
            return None
        return Transformer.from_crs(CRS.from_wkt(self.crs.to_wkt()), "EPSG:4326", always_xy=True)

    def footprint(self, window: Window, transformer: Transformer | None) -> tuple[dict | None, list[float]]:
        """The tile's geometry (its 4 pixel corners through the affine, in WGS 84 lon/lat, closed and
        counter-clockwise; a rotated affine gives a rotated quadrilateral) and its bounds in the scene's CRS."""
        col, row, width, height = window.col_off, window.row_off, window.width, window.height
        corners = [(col, row), (col, row + height), (col + width, row + height), (col + width, row)]
        xs, ys = zip(*(self.transform @ corner for corner in corners))
        bounds = [min(xs), min(ys), max(xs), max(ys)]
        if transformer is None:
            return None, bounds
        lons, lats = transformer.transform(xs, ys)
        ring = list(zip(lons, lats))
        if max(lons) - min(lons) > 180:  # across the antimeridian: one continuous ring first, then split
            return antimeridian_split(counter_clockwise([(x + 360 if x < 0 else x, y) for x, y in ring])), bounds
        ring = counter_clockwise(ring)
        return {"type": "Polygon", "coordinates": [[list(point) for point in ring + ring[:1]]]}, bounds

    def ground_size(self, transformer: Transformer | None) -> tuple[float, float] | None:
        """The first tile's width and height on the ground in metres (geodesic, so any CRS), or None."""
        if transformer is None:
            return None
        window = self.windows()[0]
        geometry, _ = self.footprint(window, transformer)
        if geometry["type"] != "Polygon":
            return None
        (lon0, lat0), (lon1, lat1), (lon2, lat2) = geometry["coordinates"][0][:3]
        return WGS84.line_length([lon1, lon2], [lat1, lat2]), WGS84.line_length([lon0, lon1], [lat0, lat1])

    def key(self) -> list[dict]:
        """What identifies the scene's content for a resumed run: every file's path, size and mtime."""
        found = []
        for path in self.paths:
            info = os.stat(path)
            found.append({"path": str(path.resolve()), "size": info.st_size, "mtime_ns": info.st_mtime_ns})
        return found


def grid(dataset) -> str:
    """A dataset's grid in words: size, CRS, origin and pixel size."""
    transform = dataset.transform
    return (
        f"{dataset.width}x{dataset.height} px, {dataset.crs}, origin {transform.c:.15g},{transform.f:.15g}, pixel "
        f"{transform.a:.15g}"
    )


def describe(scene: Scene, image_size: int) -> tuple[str, str | None]:
    """A line about the scene and its tiles for the user, and a warning when the tiles' ground resolution is far
    from the training data's (or when the scene has no georeferencing)."""
    settings = scene.settings
    count = len(scene.windows())
    crs = scene.crs.to_string() if scene.crs is not None else "no CRS"
    bands = ", ".join(dict.fromkeys(scene.band_names))
    line = (
        f"{scene.name}: {scene.width} x {scene.height} px, {scene.dtype} ({bands}), {crs}; {count} tile(s) of "
        f"{min(settings.tile, scene.width)} x {min(settings.tile, scene.height)} px"
    )
    if not scene.georeferenced:
        return line, (
            f"warning: {scene.name} has no georeferencing (no CRS or an identity transform): its features get a null "
            "geometry and only their pixel window."
        )
    size = scene.ground_size(scene.to_wgs84())
    if size is None:
        return line, None
    per_pixel = size[0] / image_size
    line += (
        f", {format_distance(size[0])} x {format_distance(size[1])} on the ground ({per_pixel:.3g} m per model pixel)"
    )
    low, high = TRAINING_METRES_PER_PIXEL
    if low <= per_pixel <= high:
        return line, None
    target = high if per_pixel > high else low
    better = max(8, round(settings.tile * target / per_pixel))
    return line, (
        f"warning: {scene.name}: each model pixel covers {per_pixel:.3g} m, but the training images are about "
        f"{low:g}-{high:g} m per pixel: captions may be poor. --tile {better} would give {target:g} m."
    )


def format_distance(metres: float) -> str:
    return f"{metres / 1000:.3g} km" if metres >= 1000 else f"{metres:.3g} m"


def is_georeferenced(path: Path) -> bool:
    """Whether rasterio opens the file with a CRS and a non-identity transform (header only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as dataset:
                return dataset.crs is not None and not dataset.transform.is_identity
        except RasterioIOError:
            return False

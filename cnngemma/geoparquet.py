"""Tile features as GeoParquet 1.1 (https://geoparquet.org/releases/v1.1.0/): one row per tile, the footprint as WKB
in WGS 84 lon/lat, written in row groups so that a run of millions of tiles is never held whole."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 10_000
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("window", pa.list_(pa.int64(), 4)),
        ("bounds", pa.list_(pa.float64(), 4)),
        ("crs", pa.string()),
        ("scene", pa.string()),
        ("nodata_fraction", pa.float64()),
        ("model", pa.string()),
        ("geometry", pa.binary()),
    ]
)


def wkb(geometry: dict | None) -> bytes | None:
    """A GeoJSON Polygon or MultiPolygon as little-endian WKB (OGC Simple Features), None for a null geometry."""
    if geometry is None:
        return None

    def polygon(rings) -> bytes:
        body = struct.pack("<BII", 1, 3, len(rings))
        for ring in rings:
            body += struct.pack("<I", len(ring)) + b"".join(struct.pack("<dd", x, y) for x, y in ring)
        return body

    if geometry["type"] == "Polygon":
        return polygon(geometry["coordinates"])
    parts = geometry["coordinates"]
    return struct.pack("<BII", 1, 6, len(parts)) + b"".join(polygon(rings) for rings in parts)


class GeoParquetWriter:
    """Writes numbered tile features to `path` in row groups; `metadata` (a dict) goes into the file's key-value
    metadata under "cnngemma", beside GeoParquet's "geo"."""

    def __init__(self, path: Path, metadata: dict):
        geo = {
            "version": "1.1.0",
            "primary_column": "geometry",
            # no "crs": GeoParquet's default is OGC:CRS84, longitude then latitude, as the footprints are
            "columns": {
                "geometry": {
                    "encoding": "WKB",
                    "geometry_types": ["Polygon", "MultiPolygon"],
                    "orientation": "counterclockwise",
                }
            },
        }
        schema = SCHEMA.with_metadata({"geo": json.dumps(geo), "cnngemma": json.dumps(metadata)})
        self.writer, self.rows = pq.ParquetWriter(path, schema), []

    def write(self, feature: dict):
        properties = feature["properties"]
        self.rows.append({"id": feature["id"], **properties, "geometry": wkb(feature["geometry"])})
        if len(self.rows) >= ROW_GROUP:
            self.flush()

    def flush(self):
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.writer.schema))
            self.rows = []

    def close(self):
        self.flush()
        self.writer.close()


def tool_of(path: Path) -> str | None:
    """The "tool" recorded in a GeoParquet file's cnngemma metadata, or None (another file, or not Parquet)."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata.get(b"cnngemma", b"{}")).get("tool")
    except (OSError, ValueError, pa.ArrowException):
        return None

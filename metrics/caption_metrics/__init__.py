"""Lets the training script import the metric without evaluate's loader:
`from metrics.caption_metrics import compute_caption_metrics` (repository root on sys.path)."""

from .caption_metrics import METRIC_KEYS, METRIC_NAMES, CaptionMetrics, compute_caption_metrics

__all__ = ["METRIC_KEYS", "METRIC_NAMES", "CaptionMetrics", "compute_caption_metrics"]

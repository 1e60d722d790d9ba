"""dataset_builder: RISCM-style caption tables -> cleaned `datasets.DatasetDict`, CLIP screening, synthetic data.

CLI: `python -m dataset_builder {build,score,synth,push} --help`.
"""

from .cleaning import CleanedCaptions, clean_captions, reference_order
from .tables import TableError, read_caption_table

__all__ = ["CleanedCaptions", "TableError", "clean_captions", "read_caption_table", "reference_order"]

"""lightning_attr: training-data attribution for PyTorch Lightning.

Simulate per-source parameter responses while the model trains (:class:`AttributionCallback`),
then score any query against every source with forward passes only (:class:`AttributionMixin`).
"""

from lightning_attr.callback import AttributionCallback
from lightning_attr.mixin import AttributionMixin, TopKAttribution
from lightning_attr.sources import IndexedDataset
from lightning_attr.store import ResponseStore, StoreError

__all__ = [
    "AttributionCallback",
    "AttributionMixin",
    "IndexedDataset",
    "ResponseStore",
    "StoreError",
    "TopKAttribution",
]
__version__ = "0.1.0"

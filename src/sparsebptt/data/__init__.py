"""Datasets for `sparsebptt train`, chosen by name with `get_dataset`.

Every dataset yields time-major batches ``x`` (T, B, input_size) float32 and labels (B,) int64
from ``dataset.batches(split, batch_size, seed=...)``; the same seed gives the same batches. A
dataset with ``sequence_targets = True`` (``text``) has one label per step instead: y (B, T).
``event-shapes`` yields event frames x (T, B, 2, H, W) (its ``input_shape`` is (2, H, W)).
"""
from __future__ import annotations

from .base import SPLITS, RateCodedDataset
from .digits import DigitsSpikes
from .digits_seq import DigitsSeq
from .event_shapes import EventShapes
from .events import DVSGesture, EventDataset, NMNIST, SHD, SSC
from .synthetic import Adding, DelayedRecall, SlowSines, SyntheticDataset
from .text import CharText

__all__ = ["DATASETS", "SPLITS", "RateCodedDataset", "DigitsSpikes", "DigitsSeq", "SyntheticDataset",
           "DelayedRecall", "Adding", "SlowSines", "EventDataset", "SHD", "SSC", "NMNIST", "DVSGesture", "CharText", "EventShapes",
           "get_dataset"]

#: name -> dataset class; each takes ``T`` first and keyword-only options after it
DATASETS = {
    DigitsSpikes.name: DigitsSpikes,
    DigitsSeq.name: DigitsSeq,
    DelayedRecall.name: DelayedRecall,
    Adding.name: Adding,
    SlowSines.name: SlowSines,
    SHD.name: SHD,
    SSC.name: SSC,
    NMNIST.name: NMNIST,
    DVSGesture.name: DVSGesture,
    CharText.name: CharText,
    EventShapes.name: EventShapes,
}


def get_dataset(name: str, T: int, **options):
    """Build the dataset called ``name`` with sequences of ``T`` steps.

    ``options`` go to the dataset's class (e.g. ``max_rate`` for ``digits-spikes``).
    """
    cls = DATASETS.get(name)
    if cls is None:
        raise ValueError(f"unknown dataset {name!r}; valid datasets are: {', '.join(sorted(DATASETS))}")
    return cls(T, **options)

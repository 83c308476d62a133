"""Neuromorphic event datasets from the user's files (``--data-dir``): SHD, SSC, N-MNIST, DVS Gesture.

Nothing is downloaded: each loader reads the files as they are distributed (or as ``tonic``
leaves them after its download) and says where to get them when one is missing. The events of
an example are binned into T steps of ``duration / T`` seconds; an input channel is 1 at a step
where it fired at least once (``binary=True``, default) or holds its spike count. Events after
``duration`` are dropped. Batches are time-major (T, B, channels) float32, built per batch from a
compact (step, channel) list per example, so a split of 8,000 examples at T = 1000 and 700
channels fits in memory.

``shd``, ``ssc``
    Spiking Heidelberg Digits / Spiking Speech Commands (Cramer et al. 2020): HDF5 files with
    ``spikes/times`` (seconds, one variable-length array per example), ``spikes/units`` (channel
    0..699) and ``labels``. SHD: ``shd_train.h5`` and ``shd_test.h5`` (SHD has no validation
    split: "val" is the test file), 20 classes. SSC: ``ssc_train.h5`` and ``ssc_valid.h5``, 35
    classes. Read with h5py (``pip install h5py``).
``nmnist``
    N-MNIST (Orchard et al. 2015): ``Train/<digit>/*.bin`` and ``Test/<digit>/*.bin``, 5 bytes per
    event (x, y, polarity bit + 23-bit timestamp in microseconds), decoded as tonic's
    ``read_mnist_file`` does. 34 x 34 pixels x 2 polarities = 2312 channels; "val" is Test.
``dvs-gesture``
    IBM DVS Gesture in tonic's layout: ``ibmGestureTrain/<user_lighting>/<label>.npy`` and
    ``ibmGestureTest/...``, each an (N, 4) array of x, y, polarity, t (milliseconds). 128 x 128
    pixels pooled by ``downsample`` (default 4: 32 x 32 x 2 = 2048 channels), 11 classes. The
    original AEDAT recordings are not read.

For every set the folder may be the data folder itself or tonic's ``save_to`` folder (which holds
``SHD/``, ``SSC/``, ``NMNIST/`` or ``DVSGesture/``).

Frames for a convolutional SNN (``--model csnn``): ``NMNIST(T, data_dir=..., frames=True)`` and
``DVSGesture(..., frames=True)`` yield x (T, B, 2, H, W) instead, each example's events (those within
``duration``) turned into T frames by ``tonic.transforms.ToFrame(sensor_size, n_time_bins=T)``
(tonic's binning: T equal half-open bins between the example's first and last event time, so the
events at the last time stamp fall out), counts clamped to 1
when ``binary``. Needs ``pip install tonic`` (``sparsebptt[frames]``); nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .base import SPLITS, LabelledSplits, check_batches_args, check_positive_int

__all__ = ["EventDataset", "SHD", "SSC", "NMNIST", "DVSGesture", "read_nmnist_bin", "tonic_frames"]


def _tonic_transforms(owner: str):
    try:
        import warnings

        with warnings.catch_warnings():  # requests' "no character detection" warning on import
            warnings.simplefilter("ignore")
            import tonic.transforms
    except ImportError as e:
        raise ImportError(f"{owner}: frames (frames=True, --model csnn) are made by tonic.transforms.ToFrame: "
                          f"pip install tonic (or 'sparsebptt[frames]'); importing it failed: {e}") from None
    return tonic.transforms


#: tonic's event record: x, y, t (microseconds), p
_TONIC_EVENT = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", np.int16)])


def tonic_frames(t_us: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray, sensor_size: tuple, T: int,
                 owner: str = "frames") -> np.ndarray:
    """One example's events as T frames (T, polarities, height, width) int16 counts, by
    ``tonic.transforms.ToFrame(sensor_size=(width, height, polarities), n_time_bins=T)``; no events
    give T empty frames."""
    w, h, n_p = sensor_size
    if len(t_us) == 0:
        return np.zeros((T, n_p, h, w), np.int16)
    ev = np.empty(len(t_us), _TONIC_EVENT)
    ev["x"], ev["y"], ev["t"], ev["p"] = x, y, np.asarray(t_us, np.int64), p
    ev = ev[np.argsort(ev["t"], kind="stable")]
    frames = _tonic_transforms(owner).ToFrame(sensor_size=sensor_size, n_time_bins=T)(ev)
    if frames.shape[0] != T:  # too few distinct times for T bins: pad with empty frames
        out = np.zeros((T, n_p, h, w), np.int16)
        out[:min(T, frames.shape[0])] = frames[:T]
        frames = out
    return frames


class EventDataset(LabelledSplits):
    """Shared binning and batching of event datasets; subclasses implement ``_read(split)``
    returning ``(examples, labels)``, each example a pair of int arrays ``(time_us, channel)``."""

    name: str = ""
    input_size: int = 0
    num_classes: int = 0
    tonic_folder: str = ""
    #: how to get the files, for the message when one is missing
    how_to_get: str = ""
    default_duration: float = 1.0

    #: (width, height) of the sensor when the channels are ``p * w * h + y * w + x`` (frames=True)
    sensor: "tuple[int, int] | None" = None

    def __init__(self, T: int, *, data_dir: "str | Path | None" = None, duration: "float | None" = None,
                 binary: bool = True, frames: bool = False):
        check_positive_int(self.name, "T", T)
        if frames and self.sensor is None:
            raise ValueError(f"{self.name}: has no pixels to make frames of (frames=True is for nmnist and "
                             "dvs-gesture)")
        self.frames = bool(frames)
        if self.frames:
            _tonic_transforms(self.name)  # fail now, not at the first batch
            self.input_shape = (2, self.sensor[1], self.sensor[0])
        if data_dir is None:
            raise ValueError(f"{self.name}: needs the folder of its files (--data-dir DIR / data_dir=); "
                             f"{self.how_to_get}")
        duration = self.default_duration if duration is None else duration
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
            raise ValueError(f"{self.name}: duration must be a positive number of seconds, got {duration!r}")
        self.T, self.duration, self.binary = T, float(duration), bool(binary)
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{self.name}: data folder {str(root)!r} does not exist; {self.how_to_get}")
        self.root = root / self.tonic_folder if (root / self.tonic_folder).is_dir() and self.tonic_folder else root
        self._steps: dict[str, np.ndarray] = {}
        self._chans: dict[str, np.ndarray] = {}
        self._offsets: dict[str, np.ndarray] = {}
        self._labels: dict[str, torch.Tensor] = {}
        for split in SPLITS:
            examples, labels = self._read(split)
            steps, chans, offsets = [], [], [0]
            for t_us, ch in examples:
                step = np.floor(np.asarray(t_us, dtype=np.float64) * (T / (self.duration * 1e6))).astype(np.int64)
                keep = (step >= 0) & (step < T)
                if self.frames:  # keep the times themselves for tonic's binning
                    step = np.asarray(t_us, dtype=np.float64).astype(np.int64)
                steps.append(step[keep])
                chans.append(np.asarray(ch, dtype=np.int64)[keep])
                offsets.append(offsets[-1] + int(keep.sum()))
            bad = [int(c.max()) for c in chans if c.size and (c.max() >= self.input_size or c.min() < 0)]
            if bad:
                raise ValueError(f"{self.name}: {split} split has channel {bad[0]} outside 0..{self.input_size - 1}; "
                                 "the files are not in the expected format")
            self._steps[split] = np.concatenate(steps) if steps else np.zeros(0, np.int64)
            self._chans[split] = np.concatenate(chans) if chans else np.zeros(0, np.int64)
            self._offsets[split] = np.asarray(offsets, dtype=np.int64)
            self._labels[split] = torch.as_tensor(np.asarray(labels, dtype=np.int64))
            lab = self._labels[split]
            if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                raise ValueError(f"{self.name}: {split} split has label {int(lab.max())} outside "
                                 f"0..{self.num_classes - 1}; the files are not in the expected format")
            if len(self._labels[split]) == 0:
                raise ValueError(f"{self.name}: the {split} split in {str(self.root)!r} has no examples")

    def _read(self, split: str):
        raise NotImplementedError

    def _file(self, *names: str) -> Path:
        for name in names:
            if (self.root / name).exists():
                return self.root / name
        raise FileNotFoundError(f"{self.name}: {str(self.root / names[0])!r} not found; {self.how_to_get}")

    def frames_of(self, split: str, idx) -> torch.Tensor:
        """Examples ``idx`` of ``split`` as frames (T, len(idx), 2, H, W) float32 made by tonic's
        ``ToFrame`` (needs ``frames=True``)."""
        if not self.frames:
            raise ValueError(f"{self.name}: frames_of needs the dataset built with frames=True")
        idx = np.asarray(idx, dtype=np.int64)
        w, h = self.sensor
        off = self._offsets[split]
        out = np.zeros((self.T, len(idx), 2, h, w), np.float32)
        for b, i in enumerate(idx):
            t_us, ch = self._steps[split][off[i]:off[i + 1]], self._chans[split][off[i]:off[i + 1]]
            p, rest = np.divmod(ch, w * h)
            y, x = np.divmod(rest, w)
            out[:, b] = tonic_frames(t_us, x, y, p, (w, h, 2), self.T, self.name)
        x = torch.from_numpy(out)
        return x.clamp_(max=1.0) if self.binary else x

    def dense(self, split: str, idx) -> torch.Tensor:
        """Examples ``idx`` of ``split`` as (T, len(idx), input_size) float32 (frames=True: as
        `frames_of`, (T, len(idx), 2, H, W))."""
        if self.frames:
            return self.frames_of(split, idx)
        idx = np.asarray(idx, dtype=np.int64)
        off = self._offsets[split]
        x = torch.zeros(self.T, len(idx), self.input_size)
        parts = [(b, off[i], off[i + 1]) for b, i in enumerate(idx)]
        steps = np.concatenate([self._steps[split][a:e] for _, a, e in parts])
        chans = np.concatenate([self._chans[split][a:e] for _, a, e in parts])
        cols = np.concatenate([np.full(e - a, b, dtype=np.int64) for b, a, e in parts])
        if steps.size:
            x.index_put_((torch.from_numpy(steps), torch.from_numpy(cols), torch.from_numpy(chans)),
                         torch.ones(steps.size), accumulate=True)
        return x.clamp_(max=1.0) if self.binary else x

    def batches(self, split: str, batch_size: int, *, seed: int,
                shuffle: "bool | None" = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: x (T, B, input_size) float32 (frames=True: (T, B, 2, H, W)), y (B,)
        int64; ``shuffle`` defaults to True for "train"; ``seed`` fixes the order."""
        shuffle = check_batches_args(self.name, split, batch_size, seed, shuffle)
        n = self.num_examples(split)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield self.dense(split, idx.numpy()), self._labels[split][idx]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.num_examples(s)}" for s in SPLITS)
        return (f"{type(self).__name__}(T={self.T}, duration={self.duration}, binary={self.binary}, "
                + ("frames=True, " if self.frames else "") +
                f"root={str(self.root)!r}, {sizes})")


def _h5py(owner: str):
    try:
        import h5py
    except ImportError:
        raise ImportError(f"{owner}: reading HDF5 needs h5py: pip install h5py (or 'sparsebptt[data]')") from None
    return h5py


class _Heidelberg(EventDataset):
    input_size = 700
    files: dict = {}

    def _read(self, split):
        h5py = _h5py(self.name)
        path = self._file(self.files[split])
        try:
            with h5py.File(path, "r") as f:
                times, units, labels = f["spikes/times"][:], f["spikes/units"][:], f["labels"][:]
        except (OSError, KeyError) as e:
            raise ValueError(f"{self.name}: cannot read {str(path)!r} as a Heidelberg spike file (HDF5 with "
                             f"spikes/times, spikes/units, labels): {str(e).splitlines()[0]}") from None
        if not len(times) == len(units) == len(labels):
            raise ValueError(f"{self.name}: {str(path)!r} has {len(times)} spike times, {len(units)} unit arrays "
                             f"and {len(labels)} labels; they must match")
        examples = [(np.asarray(t, np.float64) * 1e6, np.asarray(u)) for t, u in zip(times, units)]
        return examples, labels


class SHD(_Heidelberg):
    """Spiking Heidelberg Digits: 700 channels, 20 classes; "val" is ``shd_test.h5``."""

    name = "shd"
    num_classes = 20
    tonic_folder = "SHD"
    files = {"train": "shd_train.h5", "val": "shd_test.h5"}
    how_to_get = ("download shd_train.h5.zip and shd_test.h5.zip from https://zenkelab.org/datasets/ and unzip "
                  "them into the folder (tonic.datasets.SHD(save_to=DIR) downloads them to DIR/SHD)")


class SSC(_Heidelberg):
    """Spiking Speech Commands: 700 channels, 35 classes; "val" is ``ssc_valid.h5``."""

    name = "ssc"
    num_classes = 35
    tonic_folder = "SSC"
    files = {"train": "ssc_train.h5", "val": "ssc_valid.h5"}
    how_to_get = ("download ssc_train.h5.zip and ssc_valid.h5.zip from https://zenkelab.org/datasets/ and unzip "
                  "them into the folder (tonic.datasets.SSC(save_to=DIR) downloads them to DIR/SSC)")


def read_nmnist_bin(path: "str | Path") -> "tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]":
    """Decode an N-MNIST ``.bin`` file: arrays x, y, polarity, t (microseconds), as tonic's
    ``read_mnist_file``: 5 bytes per event; y == 240 marks a timestamp overflow (+2^13 us)."""
    raw = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if raw.size % 5:
        raise ValueError(f"nmnist: {str(path)!r} has {raw.size} bytes, not a multiple of 5 (5 bytes per event)")
    x, y, b2, b3, b4 = (raw[i::5] for i in range(5))
    p = (b2 & 128) >> 7
    t = ((b2 & 127) << 16) | (b3 << 8) | b4
    overflow = np.cumsum(y == 240) * 2 ** 13
    t = t + overflow
    keep = y != 240
    return x[keep], y[keep], p[keep], t[keep]


class NMNIST(EventDataset):
    """N-MNIST: 34 x 34 x 2 = 2312 channels (``p * 1156 + y * 34 + x``), 10 classes; "val" is Test."""

    name = "nmnist"
    input_size = 34 * 34 * 2
    sensor = (34, 34)
    num_classes = 10
    tonic_folder = "NMNIST"
    default_duration = 0.3
    folders = {"train": "Train", "val": "Test"}
    how_to_get = ("download N-MNIST (Train.zip and Test.zip, Orchard et al. 2015) and unzip them into the folder "
                  "as Train/<digit>/*.bin and Test/<digit>/*.bin (tonic.datasets.NMNIST(save_to=DIR) leaves them "
                  "in DIR/NMNIST)")

    def _read(self, split):
        folder = self._file(self.folders[split])
        files = sorted(folder.glob("[0-9]/*.bin"))
        if not files:
            raise FileNotFoundError(f"{self.name}: no <digit>/*.bin files under {str(folder)!r}; {self.how_to_get}")
        examples, labels = [], []
        for f in files:
            x, y, p, t = read_nmnist_bin(f)
            if x.size and (x.max() >= 34 or y.max() >= 34):
                raise ValueError(f"{self.name}: {str(f)!r} has pixels outside 34 x 34; not an N-MNIST file")
            examples.append((t, p * 34 * 34 + y * 34 + x))
            labels.append(int(f.parent.name))
        return examples, labels


class DVSGesture(EventDataset):
    """DVS Gesture in tonic's .npy layout: (128 / downsample)^2 x 2 channels, 11 classes; "val" is
    ``ibmGestureTest``."""

    name = "dvs-gesture"
    num_classes = 11
    sensor = (32, 32)  # at the default downsample 4 (set per instance)
    tonic_folder = "DVSGesture"
    default_duration = 6.0
    folders = {"train": "ibmGestureTrain", "val": "ibmGestureTest"}
    how_to_get = ("get tonic's preprocessed DVS Gesture (tonic.datasets.DVSGesture(save_to=DIR) downloads and "
                  "unpacks it into DIR/DVSGesture/ibmGestureTrain and ibmGestureTest, one <label>.npy per gesture)")

    def __init__(self, T: int, *, data_dir=None, duration=None, binary: bool = True, downsample: int = 4,
                 frames: bool = False):
        if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1 or 128 % downsample:
            raise ValueError(f"dvs-gesture: downsample must be a positive divisor of 128, got {downsample!r}")
        self.downsample = downsample
        self.side = 128 // downsample
        self.input_size = self.side * self.side * 2
        self.sensor = (self.side, self.side)
        super().__init__(T, data_dir=data_dir, duration=duration, binary=binary, frames=frames)

    def _read(self, split):
        folder = self._file(self.folders[split])
        files = sorted(folder.glob("*/*.npy"))
        if not files:
            raise FileNotFoundError(f"{self.name}: no <recording>/<label>.npy files under {str(folder)!r}; "
                                    f"{self.how_to_get}")
        examples, labels = [], []
        for f in files:
            ev = np.load(f)
            if ev.ndim != 2 or ev.shape[1] != 4:
                raise ValueError(f"{self.name}: {str(f)!r} holds an array of shape {ev.shape}, expected (N, 4): "
                                 "x, y, polarity, t in ms")
            x, y, p = (ev[:, i].astype(np.int64) // (self.downsample if i < 2 else 1) for i in range(3))
            t_us = ev[:, 3].astype(np.float64) * 1000.0
            examples.append((t_us, p * self.side * self.side + y * self.side + x))
            try:
                labels.append(int(f.stem))
            except ValueError:
                raise ValueError(f"{self.name}: {str(f)!r} is not named <label>.npy") from None
        return examples, labels

"""Train a two-layer LIF network with `sb.fit` on a tonic-style event dataset, then export it to NIR.

    python examples/fit_event_frames.py                       # synthetic events, no download
    python examples/fit_event_frames.py --nmnist ~/data       # tonic's N-MNIST from ~/data (pip install tonic)

A tonic dataset yields ``(events, label)``; ``transform=tonic.transforms.ToFrame(sensor_size,
n_time_bins=T)`` turns the events into frames (T, polarity, height, width): exactly the (x (T, ...),
label) items `sb.fit` takes (it collates them time-major, (T, B, ...)). Without tonic (or without
data) the script makes events in tonic's format itself: a structured array of ``x, y, t, p`` per
sample, whose class is the image row where a small sensor sees most events, binned into frames the
way ``ToFrame`` bins them.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

import sparsebptt as sb

EVENT = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", np.int8)])  # tonic's dtype
SENSOR = (8, 8, 2)  # width, height, polarities (tonic's sensor_size order)


def to_frames(events: np.ndarray, T: int, sensor=SENSOR) -> np.ndarray:
    """Events -> (T, polarity, height, width) int16 counts in T equal time bins (tonic's ToFrame with
    n_time_bins=T)."""
    w, h, p = sensor
    frames = np.zeros((T, p, h, w), dtype=np.int16)
    t0, t1 = events["t"].min(), events["t"].max() + 1
    b = ((events["t"] - t0) * T // (t1 - t0)).clip(0, T - 1)
    np.add.at(frames, (b, events["p"], events["y"], events["x"]), 1)
    return frames


class SyntheticEvents(torch.utils.data.Dataset):
    """tonic-style: ``(events, label)`` with a ``transform`` applied to the events; class c puts most
    events on rows 2c and 2c + 1."""

    classes = 4

    def __init__(self, n: int, seed: int, transform=None):
        rng = np.random.default_rng(seed)
        self.samples = []
        for _ in range(n):
            label = int(rng.integers(self.classes))
            k = 300
            ev = np.zeros(k, dtype=EVENT)
            ev["t"] = np.sort(rng.integers(0, 100_000, k))  # microseconds
            ev["x"] = rng.integers(0, SENSOR[0], k)
            on_row = rng.random(k) < 0.7
            ev["y"] = np.where(on_row, 2 * label + rng.integers(0, 2, k), rng.integers(0, SENSOR[1], k))
            ev["p"] = rng.integers(0, 2, k)
            self.samples.append((ev, label))
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        events, label = self.samples[i]
        return (self.transform(events) if self.transform else events), label


def model_for(input_shape, classes: int, hidden: int = 64) -> nn.Module:
    """Flatten each frame, two LIF layers scanned together (spike counts / T), a linear readout."""
    n_in = int(np.prod(input_shape))
    lif = sb.cells.Stack([sb.cells.LIF(n_in, hidden, beta=0.9), sb.cells.LIF(hidden, hidden, beta=0.9)])
    return nn.Sequential(nn.Flatten(2),  # [T, B, p, h, w] -> [T, B, p*h*w]
                         sb.Recurrent(lif, reduce="mean", return_state=False), nn.Linear(hidden, classes))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--strategy", default="checkpoint:5")
    ap.add_argument("--out", default="runs/example-events")
    ap.add_argument("--nmnist", default=None, metavar="DIR", help="tonic's N-MNIST under DIR (no download)")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    if args.nmnist:
        import tonic

        frames = tonic.transforms.ToFrame(tonic.datasets.NMNIST.sensor_size, n_time_bins=args.T)
        train = tonic.datasets.NMNIST(args.nmnist, train=True, transform=frames)
        val = tonic.datasets.NMNIST(args.nmnist, train=False, transform=frames)
        classes = 10
    else:
        frames = lambda ev: to_frames(ev, args.T)  # noqa: E731
        train, val = SyntheticEvents(256, 0, frames), SyntheticEvents(128, 1, frames)
        classes = SyntheticEvents.classes
    torch.manual_seed(0)
    model = model_for(train[0][0].shape[1:], classes)
    result = sb.fit(model, train, val, epochs=args.epochs, batch_size=32, lr=2e-3, strategy=args.strategy,
                    out=args.out, resume=args.resume)
    print(f"val_acc {result['val_acc']:.3f}; run folder {result['out']}")
    graph = sb.export_nir(nn.Sequential(*model[1:]), f"{args.out}/model.nir", T=args.T)
    print(f"wrote {args.out}/model.nir ({len(graph.nodes)} NIR nodes; nir.read it, or sb.import_nir)")
    return result


if __name__ == "__main__":
    main()

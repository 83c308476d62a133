"""The synthetic event-camera dataset ``event-shapes``: shapes, determinism, classes, batches, errors."""
import pytest
import torch

from sparsebptt.data import DATASETS, get_dataset
from sparsebptt.data.event_shapes import SHAPES, EventShapes


def small(**kw):
    return EventShapes(kw.pop("T", 6), size=kw.pop("size", 16), n_train=kw.pop("n_train", 40),
                       n_val=kw.pop("n_val", 20), **kw)


def test_registered_under_its_cli_name():
    assert DATASETS["event-shapes"] is EventShapes
    d = get_dataset("event-shapes", 5, size=12, n_train=10, n_val=10)
    assert d.input_shape == (2, 12, 12) and d.input_size == 288 and d.num_classes == 10 == 2 * len(SHAPES)


def test_batches_are_time_major_on_off_frames():
    d = small()
    x, y = next(d.batches("train", 8, seed=3))
    assert x.shape == (6, 8, 2, 16, 16) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert 0.005 < float(x.mean()) < 0.2  # edges and noise, not an empty or a full sensor
    sizes = [len(b[1]) for b in d.batches("val", 8, seed=0)]
    assert sizes == [8, 8, 4]


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = small(seed=1), small(seed=1), small(seed=2)
    assert torch.equal(a.frames("train"), b.frames("train")) and torch.equal(a.labels("val"), b.labels("val"))
    assert not torch.equal(a.frames("train"), c.frames("train"))
    assert not torch.equal(a.frames("train"), a.frames("val")[:1].expand(40, -1, -1, -1, -1))
    # the batch seed only orders the examples
    xa = torch.cat([x for x, _ in a.batches("train", 7, seed=5)], 1)
    xb = torch.cat([x for x, _ in a.batches("train", 7, seed=5)], 1)
    xc = torch.cat([x for x, _ in a.batches("train", 7, seed=6)], 1)
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert torch.equal(xa.sum(1), xc.sum(1))


def test_classes_balanced_and_both_polarities_present():
    d = small(n_train=50, noise=0.0)
    counts = torch.bincount(d.labels("train"), minlength=10)
    assert counts.tolist() == [5] * 10
    x = d.frames("train").float()
    on, off = x[:, :, 0].sum(), x[:, :, 1].sum()
    assert on > 0 and off > 0 and abs(float(on - off)) / float(on + off) < 0.1  # a rotating shape brightens and darkens alike


def test_split_is_a_torch_dataset():
    d = small()
    ds = d.split("val")
    assert len(ds) == 20
    x, label = ds[3]
    assert x.shape == (6, 2, 16, 16) and x.dtype == torch.float32 and label == int(d.labels("val")[3])
    assert torch.equal(x, d.frames("val")[3].float())
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 6, 2, 16, 16) and yb.tolist() == d.labels("val")[:4].tolist()


@pytest.mark.parametrize("kw, match", [
    ({"T": 0}, "T must be a positive int"),
    ({"size": 4}, "size must be at least 8 pixels"),
    ({"n_train": 0}, "n_train must be a positive int"),
    ({"noise": 1.5}, r"noise is an event probability .* \[0, 1\)"),
    ({"seed": "a"}, "seed must be an int"),
])
def test_bad_options(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        small(**kw)


def test_bad_split_and_batch():
    d = small()
    with pytest.raises(ValueError, match="unknown split 'test'"):
        d.split("test")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        next(d.batches("train", 0, seed=0))

"""Event datasets read from files (SHD, SSC, N-MNIST, DVS Gesture): small files written here in
each format are loaded by the real readers; missing files say where to get them."""
import json
import shutil

import numpy as np
import pytest
import torch

from sparsebptt import cli
from sparsebptt.data import DVSGesture, NMNIST, SHD, get_dataset
from sparsebptt.data.events import read_nmnist_bin

h5py = pytest.importorskip("h5py")


def write_heidelberg(path, times, units, labels):
    """A Heidelberg spike file as distributed: spikes/times (s), spikes/units, labels, extra/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        t = f.create_dataset("spikes/times", (len(times),), dtype=h5py.vlen_dtype(np.float32))
        u = f.create_dataset("spikes/units", (len(units),), dtype=h5py.vlen_dtype(np.uint16))
        for i, (a, b) in enumerate(zip(times, units)):
            t[i], u[i] = np.asarray(a, np.float32), np.asarray(b, np.uint16)
        f.create_dataset("labels", data=np.asarray(labels, np.uint16))
        f.create_dataset("extra/speaker", data=np.zeros(len(labels), np.uint16))


def random_heidelberg(path, n, classes, seed):
    rng = np.random.default_rng(seed)
    times, units = [], []
    for _ in range(n):
        k = int(rng.integers(5, 60))
        times.append(np.sort(rng.uniform(0, 1.2, k)))
        units.append(rng.integers(0, 700, k))
    write_heidelberg(path, times, units, rng.integers(0, classes, n))


@pytest.fixture
def shd_dir(tmp_path):
    d = tmp_path / "shd"
    # example 0: two spikes of unit 3 in step 0, one of 699 in step 5, unit 0 at 0.999 s (step 9),
    # unit 5 after the 1 s window (dropped)
    write_heidelberg(d / "shd_train.h5", [[0.0, 0.0049, 0.5, 0.999, 1.2], [0.25]], [[3, 3, 699, 0, 5], [10]],
                     [7, 19])
    random_heidelberg(d / "shd_test.h5", 9, 20, seed=1)
    return d


def test_shd_bins_events_into_T_steps(shd_dir):
    ds = SHD(10, data_dir=shd_dir)
    assert ds.input_size == 700 and ds.num_classes == 20
    assert ds.num_examples("train") == 2 and ds.num_examples("val") == 9
    x, y = next(ds.batches("train", 2, seed=0, shuffle=False))
    assert x.shape == (10, 2, 700) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [7, 19]
    expected = torch.zeros(10, 2, 700)
    expected[0, 0, 3] = expected[5, 0, 699] = expected[9, 0, 0] = 1.0
    expected[2, 1, 10] = 1.0
    assert torch.equal(x, expected)
    counts = SHD(10, data_dir=shd_dir, binary=False).dense("train", [0])
    assert counts[0, 0, 3] == 2.0 and counts.sum() == 4.0  # the 1.2 s spike is outside the window
    wide = SHD(10, data_dir=shd_dir, duration=2.0).dense("train", [0])
    assert wide[6, 0, 5] == 1.0  # 1.2 s of 2 s: step 6


def test_shd_batches_are_seeded_and_complete(shd_dir):
    ds = SHD(20, data_dir=shd_dir)
    a = list(ds.batches("val", 4, seed=3))
    b = list(ds.batches("val", 4, seed=3))
    assert [len(y) for _, y in a] == [4, 4, 1]
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    assert torch.equal(torch.cat([y for _, y in a]), ds.labels("val"))  # val keeps file order
    order = torch.cat([y for _, y in ds.batches("train", 1, seed=5)])
    assert sorted(order.tolist()) == [7, 19]


def test_tonic_layout_and_ssc(tmp_path):
    random_heidelberg(tmp_path / "SSC" / "ssc_train.h5", 6, 35, seed=2)
    random_heidelberg(tmp_path / "SSC" / "ssc_valid.h5", 4, 35, seed=3)
    ds = get_dataset("ssc", 16, data_dir=tmp_path)  # tonic's save_to folder
    assert ds.num_classes == 35 and ds.num_examples("val") == 4
    x, _ = next(ds.batches("train", 6, seed=0))
    assert x.shape == (16, 6, 700) and 0 < float(x.sum())


@pytest.mark.parametrize("make,match", [
    (lambda d: None, r"shd: data folder .* does not exist; download shd_train.h5.zip and shd_test.h5.zip from"),
    (lambda d: d.mkdir(), r"shd: '.*shd_train.h5' not found; download shd_train.h5.zip"),
])
def test_missing_files_name_the_path_and_the_source(tmp_path, make, match):
    d = tmp_path / "nowhere"
    make(d)
    with pytest.raises(FileNotFoundError, match=match):
        SHD(10, data_dir=d)


def test_bad_files_and_options(tmp_path, shd_dir):
    with pytest.raises(ValueError, match=r"shd: needs the folder of its files \(--data-dir DIR"):
        get_dataset("shd", 10)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shd_train.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"shd: cannot read .*shd_train.h5' as a Heidelberg spike file"):
        SHD(10, data_dir=bad)
    with pytest.raises(ValueError, match=r"duration must be a positive number of seconds, got 0"):
        SHD(10, data_dir=shd_dir, duration=0)
    with pytest.raises(ValueError, match=r"T must be a positive int, got 0"):
        SHD(0, data_dir=shd_dir)
    with pytest.raises(ValueError, match=r"unknown split 'test'; valid splits are: train, val"):
        SHD(4, data_dir=shd_dir).labels("test")


# ---- N-MNIST ---------------------------------------------------------------------------------

def encode_nmnist(x, y, p, t_us):
    """N-MNIST's 5-byte events; timestamps past 2^23 us are not needed here."""
    t = np.asarray(t_us, np.int64)
    raw = np.zeros((len(x), 5), np.uint8)
    raw[:, 0], raw[:, 1] = x, y
    raw[:, 2] = (np.asarray(p) << 7) | ((t >> 16) & 127)
    raw[:, 3], raw[:, 4] = (t >> 8) & 255, t & 255
    return raw.tobytes()


def write_nmnist(root, split, label, name, events):
    d = root / split / str(label)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.bin").write_bytes(encode_nmnist(*events))


def test_nmnist_reads_bin_files(tmp_path):
    root = tmp_path / "NMNIST"
    write_nmnist(root, "Train", 3, "00001", ([0, 33, 5], [0, 33, 7], [0, 1, 1], [10, 150_000, 299_999]))
    write_nmnist(root, "Train", 8, "00002", ([1], [2], [0], [0]))
    write_nmnist(root, "Test", 0, "00003", ([4], [4], [1], [100_000]))
    ds = NMNIST(3, data_dir=tmp_path)  # tonic's save_to
    assert ds.input_size == 2312 and ds.num_examples("train") == 2
    x, y = next(ds.batches("train", 2, seed=0, shuffle=False))
    assert y.tolist() == [3, 8] and x.shape == (3, 2, 2312)
    assert x[0, 0, 0] == 1 and x[1, 0, 1156 + 33 * 34 + 33] == 1 and x[2, 0, 1156 + 7 * 34 + 5] == 1
    assert x[0, 1, 2 * 34 + 1] == 1 and float(x.sum()) == 4.0
    assert NMNIST(3, data_dir=root).dense("val", [0])[1, 0, 1156 + 4 * 34 + 4] == 1


def test_nmnist_decoder_handles_overflow_events_and_matches_tonic(tmp_path):
    raw = encode_nmnist([1, 0, 2], [2, 240, 3], [1, 0, 0], [100, 0, 50])  # the middle one: overflow
    f = tmp_path / "e.bin"
    f.write_bytes(raw)
    x, y, p, t = read_nmnist_bin(f)
    assert x.tolist() == [1, 2] and y.tolist() == [2, 3] and p.tolist() == [1, 0]
    assert t.tolist() == [100, 50 + 2 ** 13]
    tonic_io = pytest.importorskip("tonic.io")
    ev = tonic_io.read_mnist_file(str(f), dtype=np.dtype([("x", int), ("y", int), ("t", int), ("p", int)]))
    assert ev["x"].tolist() == x.tolist() and ev["t"].tolist() == t.tolist() and ev["p"].tolist() == p.tolist()


def test_nmnist_missing_folder(tmp_path):
    (tmp_path / "Train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"nmnist: no <digit>/\*.bin files under .*Train'; download N-MNIST"):
        NMNIST(5, data_dir=tmp_path)


# ---- DVS Gesture -----------------------------------------------------------------------------

def test_dvs_gesture_reads_tonic_npy_layout(tmp_path):
    root = tmp_path / "DVSGesture"
    for split, user, label, ev in [
        ("ibmGestureTrain", "user01_fluorescent", 4, [[0, 0, 0, 0.0], [127, 127, 1, 2999.0], [9, 5, 1, 5999.0]]),
        ("ibmGestureTrain", "user02_led", 10, [[64, 32, 0, 100.0]]),
        ("ibmGestureTest", "user24_led", 0, [[3, 3, 1, 10.0]]),
    ]:
        (root / split / user).mkdir(parents=True, exist_ok=True)
        np.save(root / split / user / f"{label}.npy", np.asarray(ev, dtype=np.float64))
    ds = DVSGesture(6, data_dir=tmp_path)
    assert ds.input_size == 2048 and ds.num_classes == 11
    x, y = next(ds.batches("train", 2, seed=0, shuffle=False))
    assert y.tolist() == [4, 10]
    side = 32
    assert x[0, 0, 0] == 1  # (0, 0), off, t 0
    assert x[2, 0, side * side + 31 * side + 31] == 1  # (127, 127) -> (31, 31), on, 2.999 s -> step 2
    assert x[5, 0, side * side + 1 * side + 2] == 1  # (9, 5) -> (2, 1), on, 5.999 s -> step 5
    assert x[0, 1, 8 * side + 16] == 1 and float(x.sum()) == 4.0
    full = DVSGesture(6, data_dir=root, downsample=1)
    assert full.input_size == 128 * 128 * 2
    with pytest.raises(ValueError, match=r"downsample must be a positive divisor of 128, got 3"):
        DVSGesture(6, data_dir=root, downsample=3)


# ---- frames through tonic's ToFrame (for --model csnn) --------------------------------------

def test_nmnist_frames_are_tonic_to_frame(tmp_path):
    tonic_transforms = pytest.importorskip("tonic.transforms")
    root = tmp_path / "NMNIST"
    ev = ([0, 33, 5, 7], [0, 33, 7, 9], [0, 1, 1, 0], [10, 150_000, 200_000, 400_000])  # the last: past 0.3 s
    write_nmnist(root, "Train", 3, "00001", ev)
    write_nmnist(root, "Train", 8, "00002", ([1, 2], [2, 3], [0, 1], [0, 50]))
    write_nmnist(root, "Test", 0, "00003", ([4], [4], [1], [100_000]))
    ds = NMNIST(4, data_dir=tmp_path, frames=True, binary=False)
    assert ds.input_shape == (2, 34, 34) and "frames=True" in repr(ds)
    x, y = next(ds.batches("train", 2, seed=0, shuffle=False))
    assert y.tolist() == [3, 8] and x.shape == (4, 2, 2, 34, 34) and x.dtype == torch.float32
    # the same as tonic's ToFrame on the events within the duration
    dtype = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", np.int16)])
    raw = np.zeros(3, dtype)
    raw["x"], raw["y"], raw["p"], raw["t"] = ev[0][:3], ev[1][:3], ev[2][:3], ev[3][:3]
    want = tonic_transforms.ToFrame(sensor_size=(34, 34, 2), n_time_bins=4)(raw)
    assert torch.equal(x[:, 0], torch.from_numpy(want.astype(np.float32)))
    assert x[0, 0, 0, 0, 0] == 1 and x[:, 0, 0, 9, 7].sum() == 0  # (7, 9) came after 0.3 s
    one = next(ds.batches("val", 1, seed=0))[0]
    # tonic's bins are half-open: the events at an example's last time stamp fall out (here: all of them)
    assert one.shape == (4, 1, 2, 34, 34) and float(one.sum()) == 0.0


def test_dvs_gesture_frames_and_errors(tmp_path):
    pytest.importorskip("tonic.transforms")
    root = tmp_path / "DVSGesture"
    for split, label, ev in [("ibmGestureTrain", 4, [[0, 0, 0, 0.0], [127, 127, 1, 2999.0], [9, 5, 1, 5999.0]]),
                             ("ibmGestureTest", 0, [[3, 3, 1, 10.0], [3, 3, 1, 20.0]])]:
        (root / split / "user01_led").mkdir(parents=True, exist_ok=True)
        np.save(root / split / "user01_led" / f"{label}.npy", np.asarray(ev, dtype=np.float64))
    ds = DVSGesture(3, data_dir=root, frames=True, downsample=8)
    assert ds.input_shape == (2, 16, 16)
    x, _ = next(ds.batches("train", 1, seed=0))
    assert x.shape == (3, 1, 2, 16, 16) and set(x.unique().tolist()) <= {0.0, 1.0}
    # (127, 127) -> (15, 15) in the middle bin; (9, 5) at the last time stamp falls out (tonic's half-open bins)
    assert x[0, 0, 0, 0, 0] == 1 and x[1, 0, 1, 15, 15] == 1 and float(x.sum()) == 2.0
    with pytest.raises(ValueError, match="frames_of needs the dataset built with frames=True"):
        DVSGesture(3, data_dir=root).frames_of("train", [0])


def test_frames_need_pixels(shd_dir):
    with pytest.raises(ValueError, match=r"shd: has no pixels to make frames of \(frames=True is for nmnist"):
        SHD(4, data_dir=shd_dir, frames=True)


# ---- through the trainer and the command line -----------------------------------------------

def test_cli_trains_and_resumes_on_shd_files(tmp_path, capsys):
    data = tmp_path / "data"
    random_heidelberg(data / "shd_train.h5", 40, 20, seed=4)
    random_heidelberg(data / "shd_test.h5", 10, 20, seed=5)
    run = tmp_path / "run"
    argv = ["train", "--dataset", "shd", "--T", "8", "--hidden", "8", "--batch-size", "16", "--no-progress"]
    assert cli.main([*argv, "--epochs", "1", "--data-dir", str(data), "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["dataset_options"] == {"data_dir": str(data.resolve())}
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    assert cli.main(["train", "--resume", str(run), "--epochs", "2", "--data-dir", str(moved), "--no-progress"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "config.json").read_text())["dataset_options"] == {"data_dir": str(moved.resolve())}
    shutil.rmtree(moved)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the files are gone from the saved folder
        cli.main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist; download shd_train.h5.zip" in err


def test_cli_data_dir_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    assert "--data-dir is for the datasets read from files (dvs-gesture, nmnist, shd, ssc); dataset " \
           "'digits-spikes' needs none" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--dataset", "shd", "--data-dir", str(tmp_path / "none"), "--no-progress",
                  "--out", str(tmp_path / "r")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "none' does not exist" in err

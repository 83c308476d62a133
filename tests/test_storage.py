"""Storage levels: bit-packing, disk files removed in every case, clear errors."""
from __future__ import annotations

import os

import pytest
import torch

import sparsebptt as sb
from sparsebptt.storage import DiskStore, make_store, pack_bits, unpack_bits
from sparsebptt.testing import seeded


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (16, 256), (2, 3, 9)])
def test_bit_packing_roundtrip(shape):
    z = seeded(0, *shape, dtype=torch.float32, kind="spikes", p=0.4)
    packed = pack_bits(z)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-z.numel() // 8)
    assert torch.equal(unpack_bits(packed, shape, torch.float32), z)


@pytest.mark.parametrize("storage", ["device", "host", "disk"])
def test_store_roundtrip_exact(storage, tmp_path):
    v = seeded(0, 4, 6)
    z = seeded(1, 4, 6, kind="spikes")
    store = make_store(storage, (v, z), 3, binary=(False, True), disk_dir=str(tmp_path))
    for n in (5, 9, 11):
        store.save(n, (v + n, z))
    for n in (11, 5):
        got = store.load(n, release=True)
        assert torch.equal(got[0], v + n) and torch.equal(got[1], z)
    store.save(20, (v, z))  # the released slots are reused
    store.close()
    assert not list(tmp_path.iterdir())


def test_recurrent_lif_spikes_stored_packed():
    cell = sb.cells.LIF(4, 64, recurrent=True)
    x = seeded(0, 40, 8, 4, dtype=torch.float32, kind="spikes")
    with sb.trace() as t:
        y, _ = sb.scan(cell, x, strategy=sb.DoubleCheckpoint(10, 5, "host"))
        y.sum().backward()
    # 3 slow slots of (v: 8*64*4 bytes + z packed: 8*64/8 bytes)
    assert t.peak_offloaded_bytes == 3 * (8 * 64 * 4 + 8 * 64 // 8)


def _disk_files(folder):
    return [p for p in folder.rglob("*")]


def test_disk_file_removed_after_backward(tmp_path):
    cell = sb.cells.GRU(3, 5)
    y, _ = sb.scan(cell, torch.randn(30, 2, 3), strategy=sb.DoubleCheckpoint(8, 2, "disk", disk_dir=str(tmp_path)))
    assert len(_disk_files(tmp_path)) == 2  # folder + file while the graph lives
    y.sum().backward()
    assert _disk_files(tmp_path) == []


def test_disk_file_removed_when_graph_dropped(tmp_path):
    cell = sb.cells.GRU(3, 5)
    y, _ = sb.scan(cell, torch.randn(30, 2, 3), strategy=sb.DoubleCheckpoint(8, 2, "disk", disk_dir=str(tmp_path)))
    del y, _
    import gc
    gc.collect()
    assert _disk_files(tmp_path) == []


def test_disk_file_removed_after_exception(tmp_path):
    class Exploding(torch.nn.Module):
        def initial_state(self, b, device=None, dtype=None):
            return (torch.zeros(b, 2, dtype=dtype),)

        def step(self, x_t, state):
            if x_t[0, 0] > 100:
                raise ArithmeticError("boom")
            return state[0] + x_t, (state[0] + x_t,)

    x = torch.zeros(30, 1, 2)
    x[25, 0, 0] = 1000
    with pytest.raises(ArithmeticError, match="boom"):
        sb.scan(Exploding(), x, strategy=sb.DoubleCheckpoint(8, 2, "disk", disk_dir=str(tmp_path)))
    assert _disk_files(tmp_path) == []


def test_disk_full_is_a_clear_error(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(RuntimeError, match="not enough space for disk checkpoints.*needs 480 bytes"):
        DiskStore((torch.zeros(2, 5),), 12, disk_dir=str(tmp_path))
    assert _disk_files(tmp_path) == []


def test_disk_write_failure_removes_file(tmp_path, monkeypatch):
    store = DiskStore((torch.zeros(2, 5),), 2, disk_dir=str(tmp_path))

    def failing(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(RuntimeError, match="writing a disk checkpoint.*No space left.*removed"):
        store.save(3, (torch.ones(2, 5),))
    assert _disk_files(tmp_path) == []


def test_disk_dir_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(ValueError, match="disk_dir .*ro' is not writable"):
            sb.DoubleCheckpoint(8, 2, "disk", disk_dir=str(ro))
    finally:
        ro.chmod(0o700)


def test_disk_dir_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        sb.DoubleCheckpoint(8, 2, "disk", disk_dir=str(tmp_path / "nope"))


def test_unknown_storage_lists_valid():
    with pytest.raises(ValueError, match="unknown outer_storage 'ssd'; valid storages are: device, host, disk"):
        sb.DoubleCheckpoint(8, 2, "ssd")
    with pytest.raises(ValueError, match="must be a slow storage"):
        sb.DoubleCheckpoint(8, 2, "device")


@pytest.mark.parametrize("outer,inner,match", [(8, 0, "inner must be a positive int"),
                                               (4, 8, "outer must be >= inner, got outer=4, inner=8"),
                                               (0, 1, "outer must be a positive int")])
def test_double_bad_sizes(outer, inner, match):
    with pytest.raises(ValueError, match=match):
        sb.DoubleCheckpoint(outer, inner)


def test_parse_double():
    assert sb.parse_strategy("double:1024,32") == sb.DoubleCheckpoint(1024, 32)
    assert sb.parse_strategy("double-optimal:8,4") == sb.DoubleCheckpoint.optimal(8, 4)
    disk = sb.DoubleCheckpoint(64, 8, "disk")
    assert disk.to_string() == "double-disk:64,8" and sb.parse_strategy("double-disk:64,8") == disk
    with pytest.raises(ValueError, match="expected the form 'double:OUTER,INNER'"):
        sb.parse_strategy("double:1024")


def test_double_memory_below_checkpoint():
    """At T=4096 DoubleCheckpoint(512, 16) holds <= 0.6x the fast bytes of Checkpoint(64)."""
    net = sb.cells.Stack([sb.cells.LIF(8, 32), sb.cells.LIF(32, 32)])
    x = seeded(0, 4096, 2, 8, dtype=torch.float32, kind="spikes", p=0.2)
    peaks = {}
    for st in [sb.Checkpoint(64), sb.DoubleCheckpoint(512, 16, "host")]:
        with sb.trace() as t:
            y, _ = sb.scan(net, x, strategy=st, reduce="sum")
            y.sum().backward()
        peaks[st.name] = t.peak_stored_bytes
    assert peaks["double"] <= 0.6 * peaks["checkpoint"], peaks


def test_disk_full_is_a_disk_space_error(tmp_path, monkeypatch):
    """A RuntimeError still, of its own class, so that the command line can say it in one line."""
    from sparsebptt.storage import DiskSpaceError

    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, length: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(DiskSpaceError, match=rf"in '{tmp_path}': needs 480 bytes \(12 states of 40 bytes\), \d+ bytes free"):
        DiskStore((torch.zeros(2, 5),), 12, disk_dir=str(tmp_path))


def test_disk_store_folder_names_its_process(tmp_path):
    store = DiskStore((torch.zeros(2, 5),), 2, disk_dir=str(tmp_path))
    name = os.path.basename(store.folder)
    assert name.startswith("sparsebptt-") and f"-{os.getpid()}-" in name
    store.close()


def _host():
    """This machine's name as disk-store folders carry it (letters, digits and dots; '_' for the rest)."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def test_stale_disk_stores_of_gone_processes_are_removed(tmp_path):
    """What a SIGKILLed double-disk run leaves behind; live processes' and other machines' folders stay."""
    import subprocess
    import sys

    from sparsebptt.storage import remove_stale_disk_stores

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    host = _host()
    dead = tmp_path / f"sparsebptt-{host}-{dead_pid}-abc_123x"
    live = tmp_path / f"sparsebptt-{host}-{os.getppid()}-abc_123x"
    other_host = tmp_path / f"sparsebptt-elsewhere.example-{dead_pid}-abc_123x"
    old_style = tmp_path / "sparsebptt-k2j4h5g6"  # written before the pid was named: owner unknown
    for d in (dead, live, other_host, old_style):
        d.mkdir()
        (d / "checkpoints.bin").write_bytes(b"\0" * 64)
    assert remove_stale_disk_stores(tmp_path) == [str(dead)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(d.name for d in (live, other_host, old_style))


def test_a_new_disk_store_sweeps_its_folder_once(tmp_path, monkeypatch):
    from sparsebptt import storage

    monkeypatch.setattr(storage, "_swept", set())
    dead = tmp_path / f"sparsebptt-{_host()}-{2 ** 22 + 1}-abc_123x"  # above Linux's largest pid
    dead.mkdir()
    store = DiskStore((torch.zeros(2, 5),), 2, disk_dir=str(tmp_path))
    assert not dead.exists()
    dead.mkdir()
    store2 = DiskStore((torch.zeros(2, 5),), 2, disk_dir=str(tmp_path))
    assert dead.exists()  # swept once per folder and process, not at every scan
    store.close(), store2.close()


@pytest.mark.parametrize("storage", ["device", "host", "disk"])
def test_store_roundtrip_image_states(storage, tmp_path):
    """States of any shape (B, C, H, W) with an odd element count: stored and restored exactly."""
    v = seeded(0, 3, 2, 5, 7)
    z = seeded(1, 3, 2, 5, 7, kind="spikes")
    store = make_store(storage, (v, z), 2, binary=(False, True), disk_dir=str(tmp_path))
    store.save(4, (v * 2, z))
    got = store.load(4, release=True)
    assert got[0].shape == (3, 2, 5, 7) and torch.equal(got[0], v * 2) and torch.equal(got[1], z)
    store.close()


class ConvSpiking(torch.nn.Module):
    """A user cell with image-shaped membrane and spike states (B, C, H, W); spikes declared binary."""

    binary_states = (False, True)

    def __init__(self, c, h, w):
        super().__init__()
        self.shape = (c, h, w)
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)

    def initial_state(self, batch_size, device=None, dtype=None):
        return tuple(torch.zeros((batch_size,) + self.shape, device=device, dtype=dtype) for _ in range(2))

    def step(self, x_t, state):
        v, z = state
        v = 0.8 * v + x_t + self.conv(z)
        s = (v > 0.3).to(v.dtype) + (v - v.detach())  # straight-through spike
        return s, (v - 0.3 * s.detach(), s.detach())


@pytest.mark.parametrize("storage", ["host", "disk"])
def test_image_spike_states_bit_packed_in_a_stack(storage, tmp_path):
    """Inside a Stack with stateless layers, a (B, C, H, W) spike state is stored 1 bit per value,
    and the strategy equals FullBPTT."""
    def make():
        torch.manual_seed(0)
        return sb.cells.Stack([torch.nn.Conv2d(2, 3, 3, padding=1), ConvSpiking(3, 5, 7),
                               torch.nn.Flatten(), torch.nn.Linear(105, 4)]).double()

    x = seeded(0, 20, 2, 2, 5, 7)
    res = {}
    for name, strategy in [("full", sb.FullBPTT()), ("double", sb.DoubleCheckpoint(10, 5, storage, str(tmp_path)))]:
        net = make()
        xx = x.clone().requires_grad_()
        with sb.trace() as t:
            y, _ = sb.scan(net, xx, strategy=strategy)
            (y * seeded(3, *y.shape)).sum().backward()
        res[name] = [y.detach(), xx.grad] + [p.grad for p in net.parameters()]
        if name == "double":
            assert net.binary_states == (False, True)
            assert t.peak_offloaded_bytes == 1 * (2 * 105 * 8 + -(-2 * 105 // 8))  # v float64, z packed
    for a, b in zip(res["full"], res["double"]):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)

"""Where a checkpoint lives: device memory, host memory or a file on disk; spikes bit-packed.

Every store preallocates its slots once (one buffer per state component, or one file), so
saving a checkpoint never allocates: no per-step heap churn, and the memory a strategy saves
shows in the process's resident set, not only in counted bytes.

- ``"device"``: the state's own device (fast memory; on a CPU machine, RAM).
- ``"host"``: CPU memory; pinned when the state is on a GPU, copied on a side CUDA stream so the
  copy overlaps compute. On a CPU-only machine this is the same RAM as ``"device"``.
- ``"disk"``: a file in a temporary folder (``disk_dir``, default the system temp folder),
  preallocated (a full disk fails at the start, not mid-run, with `DiskSpaceError`) and removed
  afterwards, also after an exception or when the graph is dropped without a backward. The folder
  is named ``sparsebptt-<host>-<pid>-<random>``; a process killed before it could remove its
  folder (SIGKILL) leaves it behind, and the first disk store a later process opens in the same
  place removes such folders of processes that are gone (`remove_stale_disk_stores`).

State components a cell declares binary (``cell.binary_states``, e.g. LIF spikes) are stored
bit-packed, 1 bit per value, and restored exactly.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import socket
import tempfile
import weakref

import torch

__all__ = ["STORAGES", "Store", "DeviceStore", "HostStore", "DiskStore", "DiskSpaceError", "make_store",
           "pack_bits", "unpack_bits", "binary_states_of", "check_storage", "check_disk_dir",
           "remove_stale_disk_stores", "process_alive"]

log = logging.getLogger("sparsebptt.storage")

STORAGES = ("device", "host", "disk")

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor of 0/1 values -> uint8, 8 values per byte (little-endian bit order)."""
    flat = t.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 -> 0/1 values of ``dtype`` and ``shape``."""
    n = 1
    for s in shape:
        n *= s
    bits = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:n].to(dtype).reshape(shape)


def binary_states_of(cell, n_states: int) -> tuple[bool, ...]:
    """Which state components of ``cell`` only ever hold 0/1 (the cell's ``binary_states``)."""
    layers = getattr(cell, "layers", None)
    if layers is not None and not all(callable(getattr(layer, "initial_state", None)) for layer in layers):
        layers = None  # a user cell's own list of modules, not a Stack's cells
    if layers is not None and getattr(cell, "binary_states", None) is None:
        mask = []
        for layer in layers:
            k = len(layer.initial_state(1))
            mask.extend(binary_states_of(layer, k))
        return tuple(mask)
    mask = getattr(cell, "binary_states", None)
    if mask is None:
        return (False,) * n_states
    return tuple(bool(m) for m in mask)


def check_storage(owner: str, name: str, value: str) -> None:
    if value not in STORAGES:
        raise ValueError(f"{owner}: unknown {name} {value!r}; valid storages are: {', '.join(STORAGES)}")


def check_disk_dir(owner: str, disk_dir) -> None:
    if disk_dir is None:
        return
    if not os.path.isdir(disk_dir):
        raise ValueError(f"{owner}: disk_dir {str(disk_dir)!r} does not exist or is not a folder")
    if not os.access(disk_dir, os.W_OK | os.X_OK):
        raise ValueError(f"{owner}: disk_dir {str(disk_dir)!r} is not writable; pass a folder you can "
                         "write to (disk_dir=...)")


class Store:
    """Slots for checkpointed states, keyed by time step. Subclasses say where the bytes live."""

    slow = False  # counted as offloaded (slow storage) rather than stored (fast memory)

    def __init__(self, template, n_slots: int, binary=None, trace=None):
        self.shapes = [tuple(s.shape) for s in template]
        self.dtypes = [s.dtype for s in template]
        self.device = template[0].device if template else torch.device("cpu")
        self.binary = tuple(binary) if binary is not None else (False,) * len(template)
        self.n_slots = n_slots
        self.free = list(range(n_slots - 1, -1, -1))
        self.slot_of: dict[int, int] = {}
        self.trace = trace
        self.nbytes = 0
        self.closed = False
        self.initial = None
        self.owner = "sb.scan"  # who names the state in messages (the executor sets the cell's name)
        self.fixed = False  # a state has been stored: its layout is the store's from now on

    def _account(self, sign: int) -> None:
        if self.trace is None or not self.nbytes:
            return
        if self.slow:
            self.trace.add_offloaded(sign * self.nbytes)
        else:
            self.trace.add_stored(sign * self.nbytes)

    def _encode(self, i: int, s: torch.Tensor) -> torch.Tensor:
        return pack_bits(s) if self.binary[i] else s

    def _decode(self, i: int, e: torch.Tensor) -> torch.Tensor:
        if self.binary[i]:
            return unpack_bits(e, self.shapes[i], self.dtypes[i])
        return e.clone()

    def save(self, n: int, state) -> None:
        if n == 0:
            # the initial state is the caller's tensor (it may not be binary, and it is held
            # anyway): keep a reference, copy nothing
            self.initial = tuple(s.detach() for s in state)
            return
        if not self.free:
            raise RuntimeError(f"schedule stores more than the {self.n_slots} checkpoints its strategy "
                               f"declared for {type(self).__name__} (a bug in the strategy)")
        self._follow_layout(n, state)
        slot = self.free.pop()
        self.slot_of[n] = slot
        self._write(slot, [self._encode(i, s.detach()) for i, s in enumerate(state)])

    def _follow_layout(self, n: int, state) -> None:
        """The slots take the dtype and shape of the first state stored in them (the template was
        the initial state, which a cell's ``initial_state`` may have built in another dtype:
        float32 zeros for a float64 cell); every later state must keep that layout."""
        shapes, dtypes = [tuple(s.shape) for s in state], [s.dtype for s in state]
        if shapes == self.shapes and dtypes == self.dtypes:
            self.fixed = True
            return
        if len(state) != len(self.shapes):
            raise ValueError(f"{self.owner}: the state at step {n} has {len(state)} components, the "
                             f"initial state {len(self.shapes)}; a cell's step must return a state "
                             "tuple of the same length")
        i = next(k for k in range(len(state)) if (shapes[k], dtypes[k]) != (self.shapes[k], self.dtypes[k]))
        if self.fixed:
            raise ValueError(f"{self.owner}: state component {i} at step {n} is {dtypes[i]} of shape "
                             f"{shapes[i]}, but the checkpoints before it hold {self.dtypes[i]} of shape "
                             f"{self.shapes[i]}; a cell's step must keep each state component's dtype "
                             "and shape from step to step")
        self._account(-1)
        self.shapes, self.dtypes = shapes, dtypes
        self._relayout(state)
        self._account(+1)
        self.fixed = True

    def _relayout(self, template) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, n: int, release: bool) -> tuple[torch.Tensor, ...]:
        if n == 0:
            state = tuple(s.clone() for s in self.initial)
            if release:
                self.initial = None
            return state
        slot = self.slot_of[n]
        state = tuple(self._decode(i, e).to(self.device) for i, e in enumerate(self._read(slot)))
        if release:
            del self.slot_of[n]
            self.free.append(slot)
        return state

    def _write(self, slot, encoded):  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, slot):  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._account(-1)
            self._release()

    def _release(self) -> None:
        pass


def _encoded_layout(template, binary):
    """(shape, dtype) of each encoded component: packed bytes for binary ones."""
    out = []
    for s, b in zip(template, binary):
        if b:
            out.append(((-(-s.numel() // 8),), torch.uint8))
        else:
            out.append((tuple(s.shape), s.dtype))
    return out


class DeviceStore(Store):
    """Preallocated slots on the state's own device."""

    def __init__(self, template, n_slots, binary=None, trace=None, device=None, pin=False):
        super().__init__(template, n_slots, binary, trace)
        self._where = (self.device if device is None else device, pin)
        self._relayout(template)
        self._account(+1)

    def _relayout(self, template):
        dev, pin = self._where
        self.buffers = []  # the old ones go before the new ones are allocated
        self.buffers = [torch.empty((self.n_slots,) + shape, dtype=dtype, device=dev, pin_memory=pin)
                        for shape, dtype in _encoded_layout(template, self.binary)]
        self.nbytes = sum(b.numel() * b.element_size() for b in self.buffers)

    def _write(self, slot, encoded):
        for buf, e in zip(self.buffers, encoded):
            buf[slot].copy_(e)

    def _read(self, slot):
        return [buf[slot] for buf in self.buffers]

    def _release(self):
        self.buffers = []


class HostStore(DeviceStore):
    """Slots in CPU memory; pinned, and filled on a side stream, when the state is on a GPU."""

    slow = True

    def __init__(self, template, n_slots, binary=None, trace=None):
        on_gpu = bool(template) and template[0].device.type == "cuda"
        super().__init__(template, n_slots, binary, trace, device=torch.device("cpu"), pin=on_gpu)
        self.stream = torch.cuda.Stream(self.device) if on_gpu else None
        self.events: dict[int, object] = {}

    def _write(self, slot, encoded):
        if self.stream is None:
            return super()._write(slot, encoded)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for buf, e in zip(self.buffers, encoded):
                buf[slot].copy_(e, non_blocking=True)
                e.record_stream(self.stream)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[slot] = ev

    def _read(self, slot):
        ev = self.events.pop(slot, None)
        if ev is not None:
            ev.synchronize()
        return super()._read(slot)


class DiskSpaceError(RuntimeError):
    """The disk cannot hold a disk store's checkpoints. The message is one line naming the file or
    folder and the bytes needed; the store's file is already removed."""


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


#: ``sparsebptt-<host>-<pid>-<random>``: the folder of a `DiskStore` (mkdtemp's random part has no '-')
_STORE_FOLDER = re.compile(r"sparsebptt-(?P<host>.+)-(?P<pid>[0-9]+)-[a-z0-9_]+")
_swept: set = set()  # folders this process has already swept
_live_folders: set = set()  # this process's open disk-store folders


def process_alive(pid: int) -> bool:
    """True if a process with id ``pid`` runs on this machine (also when it is another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # larger than any pid
        return False
    return True


def remove_stale_disk_stores(where=None) -> list:
    """Remove the disk-store folders in ``where`` (default: the system temp folder) that processes
    of this machine and user left behind when they were killed (SIGKILL) before removing them:
    those whose pid (in the folder's name) no longer runs. Folders of live processes, of other
    machines or users, and folders not named by this version are left alone. Returns the removed
    paths."""
    where = tempfile.gettempdir() if where is None else os.fspath(where)
    host, removed = _host_tag(), []
    try:
        names = os.listdir(where)
    except OSError:
        return removed
    for name in names:
        m = _STORE_FOLDER.fullmatch(name)
        if m is None or m.group("host") != host:
            continue
        pid = int(m.group("pid"))
        path = os.path.join(where, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid():
            continue
        if pid != os.getpid() and process_alive(pid):
            continue
        if pid == os.getpid() and path in _live_folders:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    if removed:
        log.info("sparsebptt: removed %d disk-checkpoint folder(s) of processes that are gone: %s",
                 len(removed), ", ".join(removed))
    return removed


def _remove(fd, folder):
    _live_folders.discard(folder)
    try:
        os.close(fd)
    except OSError:
        pass
    shutil.rmtree(folder, ignore_errors=True)


class DiskStore(Store):
    """Slots in one preallocated file, removed on close (and on garbage collection)."""

    slow = True

    def __init__(self, template, n_slots, binary=None, trace=None, disk_dir=None):
        super().__init__(template, n_slots, binary, trace)
        layout = _encoded_layout(template, self.binary)
        self.layout = layout
        sizes = []
        for shape, dtype in layout:
            n = 1
            for s in shape:
                n *= s
            sizes.append(n * torch.empty((), dtype=dtype).element_size())
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = sizes
        self.slot_bytes = sum(sizes)
        self.nbytes = self.slot_bytes * n_slots
        where = disk_dir if disk_dir is not None else tempfile.gettempdir()
        key = os.path.realpath(where)
        if key not in _swept:  # once per folder and process: what killed runs left there
            _swept.add(key)
            remove_stale_disk_stores(where)
        try:
            self.folder = tempfile.mkdtemp(prefix=f"sparsebptt-{_host_tag()}-{os.getpid()}-", dir=where)
            _live_folders.add(self.folder)
        except OSError as e:
            raise ValueError(f"DiskStore: cannot create a checkpoint folder in {str(where)!r}: {e.strerror}; "
                             "pass a writable disk_dir") from None
        self.path = os.path.join(self.folder, "checkpoints.bin")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._finalizer = weakref.finalize(self, _remove, self.fd, self.folder)
        try:
            if self.nbytes:
                os.posix_fallocate(self.fd, 0, self.nbytes)
        except OSError as e:
            self._finalizer()
            raise DiskSpaceError(f"not enough space for disk checkpoints in {where!r}: needs {self.nbytes} "
                                 f"bytes ({n_slots} states of {self.slot_bytes} bytes), {_free(where)} free: "
                                 f"{e.strerror}. Free space, choose another disk_dir (TMPDIR for `sparsebptt "
                                 "train`), or use outer_storage='host'") from None
        self._account(+1)

    def _relayout(self, template):
        """Lay the file out again for states like ``template`` (no slot holds a state yet)."""
        layout = _encoded_layout(template, self.binary)
        sizes = [math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in layout]
        self.layout, self.sizes = layout, sizes
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.slot_bytes = sum(sizes)
        self.nbytes = self.slot_bytes * self.n_slots
        try:
            os.ftruncate(self.fd, 0)
            if self.nbytes:
                os.posix_fallocate(self.fd, 0, self.nbytes)
        except OSError as e:
            self.nbytes = 0
            self.close()
            raise RuntimeError(f"not enough space for disk checkpoints in {self.path!r}: needs "
                               f"{self.slot_bytes * self.n_slots} bytes ({self.n_slots} states of "
                               f"{self.slot_bytes} bytes): {e.strerror}; the file was removed") from None

    def _write(self, slot, encoded):
        base = slot * self.slot_bytes
        for off, size, e in zip(self.offsets, self.sizes, encoded):
            data = e.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
            try:
                written = os.pwrite(self.fd, memoryview(data), base + off)
            except OSError as err:
                self.close()
                raise RuntimeError(f"writing a disk checkpoint to {self.path!r} failed: {err.strerror}; "
                                   "the file was removed") from None
            if written != size:
                self.close()
                raise RuntimeError(f"short write of a disk checkpoint to {self.path!r} "
                                   f"({written} of {size} bytes; disk full?); the file was removed")

    def _read(self, slot):
        base = slot * self.slot_bytes
        out = []
        for off, size, (shape, dtype) in zip(self.offsets, self.sizes, self.layout):
            raw = bytearray(os.pread(self.fd, size, base + off))
            out.append(torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape))
        return out

    def _release(self):
        self._finalizer()


def _free(where) -> str:
    try:
        return f"{shutil.disk_usage(where).free} bytes"
    except OSError:
        return "unknown bytes"


def make_store(storage: str, template, n_slots: int, binary=None, trace=None, disk_dir=None) -> Store:
    """A store of ``n_slots`` states shaped like ``template`` in ``storage`` (see `STORAGES`)."""
    check_storage("make_store", "storage", storage)
    if storage == "device":
        return DeviceStore(template, n_slots, binary, trace)
    if storage == "host":
        return HostStore(template, n_slots, binary, trace)
    return DiskStore(template, n_slots, binary, trace, disk_dir)

"""DDP: two gloo processes on the CPU, each on its share of the batch, give the gradient of one
process on the whole batch, under every strategy (the checkpointing ones back-propagate with
``torch.autograd.grad`` inside a custom autograd.Function's backward)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sparsebptt.data import get_dataset
from sparsebptt.testing import assert_close
from sparsebptt.train import TrainConfig, build_model
from sparsebptt.train.distributed import shard, share_loss

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

T, BATCH = 9, 13
BATCH_SIZES = (BATCH, 1)  # shares of 6 and 7 examples; one example, so rank 1's share is empty
CASES = [(model, strategy) for model in ("lif", "gru")
         for strategy in ("full", "checkpoint:3", "revolve:2", "double:4,2", "skipper:3,3")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    ds = get_dataset("digits-spikes", T)
    return next(ds.batches("train", BATCH, seed=1))


def _model(model: str, strategy: str):
    torch.manual_seed(0)
    return build_model(TrainConfig(model=model, hidden=12, layers=2, T=T, strategy=strategy), 64, 10)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel

        x, y = _batch()
        grads = {}
        for batch_size in BATCH_SIZES:
            xb, yb = x[:, :batch_size], y[:batch_size]
            for model, strategy in CASES:
                core = _model(model, strategy)
                ddp = DistributedDataParallel(core, find_unused_parameters=False)
                xs, ys, n, empty = shard(xb, yb, rank, world)
                for step in range(2):  # a second iteration: DDP's reducer must be ready again
                    core.zero_grad(set_to_none=True)
                    loss, _ = share_loss(ddp(xs), ys, n, world, empty)
                    loss.backward()
                grads[f"B{batch_size}/{model}/{strategy}"] = {k: p.grad.clone()
                                                              for k, p in core.named_parameters()}
        torch.save(grads, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it (aborted a process once)
    finally:
        dist.destroy_process_group()


def _reference():
    x, y = _batch()
    ref = {}
    for batch_size in BATCH_SIZES:
        for model, strategy in CASES:
            core = _model(model, strategy)
            F.cross_entropy(core(x[:, :batch_size]), y[:batch_size]).backward()
            ref[f"B{batch_size}/{model}/{strategy}"] = {k: p.grad.clone() for k, p in core.named_parameters()}
    return ref


def test_ddp_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ref = _reference()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(got) == set(ref)
        for case in ref:
            assert set(got[case]) == set(ref[case]), case
            for name in ref[case]:
                # float32 sums in another order (the all-reduce): a few ulps
                assert_close(f"rank{rank} {case} {name}", ref[case][name], got[case][name], torch.float32)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed beside this python")
def test_torchrun_train_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m sparsebptt train` trains one model on two shares."""
    argv = ["train", "--T", "4", "--hidden", "8", "--batch-size", "256", "--epochs", "2",
            "--strategy", "checkpoint:2", "--no-progress"]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port", str(_free_port()), "-m", "sparsebptt",
                        *argv, "--out", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes (cpu)" in r.stdout
    from sparsebptt import cli

    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    rows = {k: [json.loads(line) for line in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
            for k in ("ddp", "one")}
    assert [r["epoch"] for r in rows["ddp"]] == [1, 2]
    for a, b in zip(rows["ddp"], rows["one"]):
        assert a["train_acc"] == pytest.approx(b["train_acc"], abs=2 / 1437)  # argmax ties may flip
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=2 / 360)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    # resume under torchrun too
    r = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port", str(_free_port()), "-m", "sparsebptt",
                        "train", "--resume", str(tmp_path / "ddp"), "--epochs", "3", "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]

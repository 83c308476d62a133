"""``--model csnn``: the VGG-style conv SNN on event frames, its strategies and its place in the trainer."""
import json

import pytest
import torch

import sparsebptt as sb
from sparsebptt.testing import assert_close
from sparsebptt import cli
from sparsebptt.train import TrainConfig, build_model, train
from sparsebptt.train.models import ConvSpikingClassifier, conv_stack

SMALL = {"size": 16, "n_train": 24, "n_val": 12}


def frames(T, B, shape=(2, 13, 13), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, *shape, generator=g) < 0.3).to(dtype)


def test_conv_stack_layers_and_features():
    stack, features = conv_stack((2, 16, 16), (4, 8))
    kinds = [type(m).__name__ for m in stack.layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "LIFNeuron", "MaxPool2d"] * 2 + ["Flatten"]
    assert features == 8 * 4 * 4
    assert stack.layers[6].shape == (8, 8, 8)


@pytest.mark.parametrize("args, match", [
    (((2, 16), (4,)), r"input_shape must be \(channels, height, width\)"),
    (((2, 16, 16), ()), "widths must be positive ints, one per block"),
    (((2, 16, 16), (4, 0)), "widths must be positive ints"),
    (((2, 8, 8), (4, 4, 4, 4)), r"4 blocks pool 8 x 8 pixels by 16; use fewer widths \(at most 3\)"),
])
def test_conv_stack_errors(args, match):
    with pytest.raises(ValueError, match=match):
        conv_stack(*args)


def test_forward_shapes_odd_sizes():
    torch.manual_seed(0)
    model = ConvSpikingClassifier((2, 13, 13), 10, widths=(3, 5)).double()
    x = frames(5, 3)
    logits = model(x)
    assert logits.shape == (3, 10) and logits.dtype == torch.float64
    assert model(x, return_aux=True)[1] is None


def _one_step(strategy, x, y, seed=0):
    torch.manual_seed(seed)
    model = ConvSpikingClassifier((2, 13, 13), 4, widths=(3, 5), threshold=0.5, strategy=strategy).double()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    bn = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, bn


@pytest.mark.parametrize("strategy", ["checkpoint:3", "revolve:2", "double:4,2", "double-disk:4,2"])
def test_exact_strategies_equal_full(strategy):
    """Loss, every parameter gradient and batch norm's running statistics after one step."""
    x, y = frames(7, 3), torch.tensor([0, 3, 1])
    lf, gf, bf = _one_step("full", x, y)
    ls, gs, bs = _one_step(strategy, x, y)
    assert_close("loss", lf, ls)
    assert gf.keys() == gs.keys() and any(float(g.abs().sum()) > 0 for g in gf.values())
    for n in gf:
        assert_close(n, gf[n], gs[n])
    for k in bf:
        assert_close(k, bf[k], bs[k])


def test_skipper_quarter_runs_and_stores_less():
    x, y = frames(16, 2), torch.tensor([1, 2])
    stored = {}
    for s in ("full", "skipper:8,2"):
        with sb.trace() as t:
            _one_step(s, x, y)
        stored[s] = t.peak_stored_bytes
    assert 0 < stored["skipper:8,2"] < stored["full"] / 2


def test_build_model_needs_frames_and_frames_need_csnn():
    with pytest.raises(ValueError, match=r"model 'csnn' needs a dataset of frames \(C, H, W\) per step, such as "
                                         r"event-shapes; dataset 'digits-spikes' yields 64 features"):
        build_model(TrainConfig(model="csnn"), 64, 10)
    with pytest.raises(ValueError, match=r"dataset 'event-shapes' yields frames \(2, 16, 16\) per step; train it "
                                         r"with --model csnn"):
        build_model(TrainConfig(dataset="event-shapes"), 512, 10, input_shape=(2, 16, 16))
    m = build_model(TrainConfig(dataset="event-shapes", model="csnn", widths="4,6"), 512, 10, input_shape=(2, 16, 16))
    assert isinstance(m, ConvSpikingClassifier) and m.widths == (4, 6) and m.readout.in_features == 6 * 4 * 4


@pytest.mark.parametrize("kwargs, match", [
    ({"model": "lif", "widths": "4,8"}, "widths are the conv blocks of model 'csnn', got model 'lif'"),
    ({"model": "csnn", "widths": "4,x"}, r"widths must be positive ints separated by commas \(e.g. '16,32,64'\), "
                                         r"got '4,x'"),
    ({"model": "csnn", "widths": "4,0"}, "widths must be positive ints"),
    ({"model": "csnn", "gate_init": "chrono"}, "model 'csnn' has no gates"),
    ({"model": "csnn", "threshold": 0.0}, "threshold must be a number > 0 for model 'csnn'"),
])
def test_train_config_csnn_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("how", [{"strategy": "checkpoint:2"}, {"memory_budget": "600KiB"}])
def test_trainer_runs_csnn_on_event_shapes(tmp_path, how):
    config = TrainConfig(dataset="event-shapes", model="csnn", widths="4,6", T=4, epochs=1, batch_size=12,
                         dataset_options=SMALL, **how)
    summary = train(config, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0.0 <= rows[0]["val_acc"] <= 1.0 and rows[0]["peak_stored_bytes"] > 0
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["widths"] == "4,6" and meta["model"] == "csnn"
    assert summary is not None


def test_cli_csnn_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", "csnn", "--widths", "8,a", "--out", str(tmp_path / "a")])
    assert e.value.code == 2
    assert "widths must be positive ints separated by commas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", "csnn", "--T", "2", "--no-progress", "--out", str(tmp_path / "b")])
    assert "model 'csnn' needs a dataset of frames" in capsys.readouterr().err

"""The ``sparsebptt`` command line: ``sparsebptt train [options]`` (also ``python -m sparsebptt``)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``sparsebptt train: error: ... (see --help)`` and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def fail(self, message: str, status: int = 1):
        """A one-line error that is not a usage mistake (exit status 1 by default)."""
        self.exit(status, f"{self.prog}: error: {message}\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM while training, raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs
    (temporary files removed, the last checkpoint kept) and the command exits with 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _interrupted(e: KeyboardInterrupt, out=None) -> "tuple[str, int]":
    """The one line and exit status for Ctrl-C (130) or SIGTERM (143), with a --resume hint only
    when ``out`` holds a checkpoint to continue from."""
    what, status = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
    if out is None:
        return what, status
    from pathlib import Path

    from .train.runs import CHECKPOINT_FILE

    if (Path(out) / CHECKPOINT_FILE).is_file():
        return (f"{what}; the run keeps its last finished epoch: continue it with sparsebptt train --resume "
                f"{out}"), status
    return f"{what} before any epoch finished; there is nothing to resume in {str(out)!r}", status


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _strategy(text: str) -> str:
    from .strategies import parse_strategy

    try:
        return parse_strategy(text).to_string()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .train import GATE_INITS, MODELS, TrainConfig

    d = TrainConfig()
    parser = _Parser(
        prog="sparsebptt",
        description="Memory- and compute-sparse backpropagation through time for spiking and "
                    "recurrent networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    t = sub.add_parser(
        "train", help="train a spiking or recurrent classifier under a memory strategy",
        description="Train a stack of LIF layers (spike counts -> linear readout) or of GRU / LSTM / "
                    "Delta GRU / Delta LSTM layers (last hidden state -> linear readout) or EGRU layers "
                    "(mean event output -> linear readout) with Adam, writing config.json and "
                    "metrics.jsonl into the run folder; the activity per layer (spike rates, "
                    "transmitted deltas, event rates) is printed every epoch. --dataset text (or "
                    "--text PATH) trains a character-level language model (a readout at every step) "
                    "and reports bits per character.")
    t.add_argument("--dataset", default=d.dataset, choices=sorted(DATASETS),
                   help="dataset name (default: %(default)s)")
    t.add_argument("--model", default=d.model, choices=list(MODELS),
                   help="lif: LIF layers, spike counts -> readout; gru, lstm, delta-gru, delta-lstm: "
                        "recurrent layers, last hidden state -> readout; egru: event-based GRU layers, "
                        "mean event output -> readout; csnn: VGG-style conv-BN-LIF-pool blocks on event frames "
                        "(--dataset event-shapes, nmnist/dvs-gesture frames), firing rates -> readout "
                        "(default: %(default)s)")
    t.add_argument("--threshold", type=_non_negative_float, default=None,
                   help="LIF firing threshold (default 1.0), or the delta threshold of delta-gru / "
                        "delta-lstm (default 0.1), or every EGRU unit's initial threshold (default: "
                        "per-unit draws from EvNN's Beta distribution, mean 0.3)")
    t.add_argument("--text", default=None, metavar="PATH",
                   help="train the character-level language model (--dataset text) on this UTF-8 text "
                        "file instead of the built-in corpus (the standard library's source)")
    t.add_argument("--activity-reg", type=_non_negative_float, default=d.activity_reg, metavar="STRENGTH",
                   help="egru: add STRENGTH times the mean event rate above --activity-target to the "
                        "loss (default: %(default)s, off)")
    t.add_argument("--activity-target", type=_non_negative_float, default=d.activity_target, metavar="RATE",
                   help="egru: event rate per step the activity regulariser allows (default: %(default)s)")
    t.add_argument("--T", type=_positive_int, default=d.T, help="time steps per example (default: %(default)s)")
    t.add_argument("--epochs", type=_positive_int, default=d.epochs, help="passes over the training split (default: %(default)s)")
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="examples per step (default: %(default)s)")
    t.add_argument("--hidden", type=_positive_int, default=d.hidden, help="LIF neurons per layer (default: %(default)s)")
    t.add_argument("--layers", type=_positive_int, default=d.layers, help="layers (default: %(default)s)")
    t.add_argument("--widths", default=None, metavar="C1,C2,...",
                   help="csnn: channels of each conv-BN-LIF-pool block, one block per width (default: 16,32,64)")
    t.add_argument("--gate-init", default=d.gate_init, choices=list(GATE_INITS),
                   help="gate biases of gru / lstm / delta models: uniform (PyTorch's) or chrono (memory "
                        "time scales spread up to T, for long-range tasks) (default: %(default)s)")
    t.add_argument("--lr", type=_positive_float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    t.add_argument("--strategy", type=_strategy, default=d.strategy,
                   help="memory strategy: full, checkpoint:EVERY, revolve:SLOTS, ... (default: %(default)s)")
    t.add_argument("--memory-budget", type=_budget, default=None, metavar="SIZE",
                   help="let the planner pick the fastest strategy whose stored bytes fit SIZE "
                        "(e.g. 256MiB); replaces --strategy")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and of every batch (default: %(default)s)")
    t.add_argument("--threads", type=_positive_int, default=d.threads,
                   help="torch intra-op threads while training (default: %(default)s)")
    t.add_argument("--out", default=None, metavar="DIR", help="run folder (default: runs/<timestamp>)")
    t.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder of the files of shd, ssc, nmnist or dvs-gesture (as distributed, or tonic's "
                        "save_to folder); nothing is downloaded")
    t.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its last finished epoch, with its saved config "
                        "(options given must match it, but --epochs, --threads, --device and "
                        "--no-progress); metrics.jsonl keeps each epoch once")
    t.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cpu, or the run's device with --resume); under "
                        "torchrun each process takes cuda:LOCAL_RANK")
    t.add_argument("--no-progress", action="store_true", help="no progress bars, one line per epoch")
    t.set_defaults(run=_cmd_train, subparser=t)

    p = sub.add_parser(
        "plan", help="print the strategies that fit a memory budget, fastest first",
        description="Model the fast-memory bytes, slow-memory bytes and recomputation of each candidate "
                    "strategy for a model and shape, and mark the one sb.plan chooses for the budget.")
    p.add_argument("--model", choices=sorted(_PLAN_MODELS), default="lif",
                   help="lif: a stack of LIF layers; gru, lstm: one cell per layer (default: %(default)s)")
    p.add_argument("--T", type=_positive_int, required=True, help="sequence length")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="batch size (default: %(default)s)")
    p.add_argument("--hidden", type=_positive_int, default=256, help="units per layer (default: %(default)s)")
    p.add_argument("--layers", type=_positive_int, default=2, help="layers (default: %(default)s)")
    p.add_argument("--input-size", type=_positive_int, default=64, help="input features (default: %(default)s)")
    p.add_argument("--memory-budget", type=_budget, required=True, metavar="SIZE",
                   help="fast-memory budget, e.g. 256MiB")
    p.add_argument("--slow-storage", choices=["host", "disk"], default="host",
                   help="where double checkpointing keeps its coarse checkpoints (default: %(default)s)")
    p.add_argument("--rows", type=_positive_int, default=15, help="table rows to print (default: %(default)s)")
    p.set_defaults(run=_cmd_plan, subparser=p)

    r = sub.add_parser(
        "report", help="plot and compare training runs",
        description="Draw the training loss, accuracy, wall time per epoch and peak stored memory of "
                    "one or more run folders into a PNG and print a comparison table.")
    r.add_argument("runs", nargs="+", metavar="DIR", help="run folders written by `sparsebptt train`")
    r.add_argument("--png", default=None, metavar="PATH",
                   help="where to write the figure (default: DIR/report.png for one run, report.png for several)")
    r.set_defaults(run=_cmd_report, subparser=r)

    e = sub.add_parser(
        "export", help="export a trained LIF run to NIR",
        description="Write the LIF stack and readout of a run folder (its checkpoint.pt) in the "
                    "Neuromorphic Intermediate Representation (needs `pip install nir`). NIR's neurons "
                    "are continuous-time: one step is --dt seconds, tau = dt/(1-beta), r = tau/dt (see "
                    "sparsebptt.nir). For snnTorch's import_from_nir pass --dt 1e-4 --subtract-reset zero; "
                    "for Norse's from_nir pass --fold-r and give it the same dt.")
    e.add_argument("--nir", required=True, metavar="RUN_DIR", help="run folder written by `sparsebptt train`")
    e.add_argument("--out", default=None, metavar="PATH", help="NIR file to write (default: RUN_DIR/model.nir)")
    e.add_argument("--subtract-reset", choices=["exact", "zero"], default="exact",
                   help="exact: subtractive reset as LI -> Threshold with a back edge (default); zero: NIR "
                        "LIF nodes with reset to zero (approximate, for targets that only run LIF)")
    e.add_argument("--dt", type=_positive_float, default=1.0,
                   help="seconds one time step stands for (tau = dt/(1-beta)); snnTorch and SpikingJelly "
                        "assume 1e-4 (default: %(default)s)")
    e.add_argument("--fold-r", action="store_true",
                   help="write r = 1 and scale the weights into each neuron by r instead (Norse's importer "
                        "ignores r)")
    e.set_defaults(run=_cmd_export, subparser=e)
    return parser


def _cmd_export(args, parser) -> int:
    from pathlib import Path

    import torch

    from .nir import export_nir
    from .train import build_model
    from .train.runs import CHECKPOINT_FILE, RunError, config_from_run, load_checkpoint
    from .data import get_dataset

    run = Path(args.nir)
    try:
        config = config_from_run(run)
        if config.model != "lif":
            raise RunError(f"the run in {str(run)!r} trained model {config.model!r}; NIR export covers LIF "
                           "models (--model lif)")
        ckpt = load_checkpoint(run / CHECKPOINT_FILE)
        if ckpt is None:
            raise RunError(f"the run in {str(run)!r} has no {CHECKPOINT_FILE} (no epoch finished); train it "
                           "first or resume it with sparsebptt train --resume")
    except RunError as err:
        parser.fail(str(err), 2)
    try:
        dataset = get_dataset(config.dataset, config.T, **(config.dataset_options or {}))
        torch.manual_seed(config.seed)
        model = build_model(config, dataset.input_size, dataset.num_classes)
        model.load_state_dict(ckpt["model"])
        out = run / "model.nir" if args.out is None else Path(args.out)
        graph = export_nir(model, out, T=config.T, subtract_reset=args.subtract_reset, dt=args.dt,
                           fold_r=args.fold_r)
    except ImportError as err:
        parser.fail(str(err))
    except (ValueError, TypeError, OSError) as err:
        parser.fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    sizes = " -> ".join(str(n) for n in [dataset.input_size] + [config.hidden] * config.layers)
    print(f"wrote {out}: {config.layers} LIF layers ({sizes}), readout to {dataset.num_classes} classes "
          f"(epoch {ckpt['epoch']}, val_acc {ckpt['val_acc']:.4f}); {len(graph.nodes)} NIR nodes, one step = dt = "
          f"{args.dt:g}; "
          f"reset: {graph.metadata['reset']}")
    if any(type(n).__name__ in ("LI", "I") for n in graph.nodes.values()):
        print("note: snnTorch's and Norse's NIR importers run only LIF / IF neurons; for them pass "
              "--subtract-reset zero (reset to zero: approximate for this reset='subtract' model)")
    return 0


def _cmd_report(args, parser) -> int:
    from .report import report
    from .train.runs import RunError

    try:
        table, png = report(args.runs, args.png)
    except RunError as e:
        parser.fail(str(e), 2)
    except (OSError, ValueError) as e:
        parser.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(table)
    print(f"figure: {png}")
    return 0


_PLAN_MODELS = {"lif": "LIF", "gru": "GRU", "lstm": "LSTM"}


def _budget(text: str) -> str:
    from .planner import parse_bytes

    try:
        parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _cmd_plan(args, parser) -> int:
    from . import cells
    from .planner import format_bytes, parse_bytes, plan

    cls = getattr(cells, _PLAN_MODELS[args.model])
    sizes = [args.input_size] + [args.hidden] * args.layers
    net = cells.Stack([cls(a, b) for a, b in zip(sizes, sizes[1:])])
    shape = (args.T, args.batch_size, args.input_size)
    try:
        chosen, table = plan(net, shape, args.memory_budget, slow_storage=args.slow_storage,
                             return_table=True)
    except ValueError as e:
        parser.exit(1, f"sparsebptt plan: {e}\n")
    limit = parse_bytes(args.memory_budget)
    fits = [e for e in table if e.fast_bytes <= limit]
    print(f"{args.layers}-layer {args.model}, T={args.T}, B={args.batch_size}, hidden={args.hidden}, "
          f"input={args.input_size}; budget {format_bytes(limit)} of fast memory; "
          f"{len(fits)} of {len(table)} candidates fit")
    print(f"  {'strategy':<24} {'fast memory':>12} {'slow memory':>12} {'recompute':>10}")
    for e in fits[:args.rows]:
        mark = "*" if e.strategy == chosen else " "
        print(f"{mark} {e.strategy.to_string():<24} {format_bytes(e.fast_bytes):>12} "
              f"{format_bytes(e.slow_bytes):>12} {e.recompute_factor:>9.2f}x")
    print(f"chosen: {chosen.to_string()} (* above); recompute = cell steps run / T")
    return 0


def _explicit_train_options(args) -> dict:
    """The ``train`` options given on the command line (not defaulted): dest -> parsed value."""
    parser = build_parser()
    first = parser.parse_args(args.argv)
    for action in first.subparser._actions:
        action.default = argparse.SUPPRESS
    ns = vars(parser.parse_args(args.argv))
    return {k: v for k, v in ns.items() if k not in ("command", "run", "subparser")}


def _cmd_train(args, parser) -> int:
    import dataclasses
    from pathlib import Path

    from .planner import BudgetError
    from .storage import DiskSpaceError
    from .train import TrainConfig, default_out_dir, train
    from .train.runs import RESUME_MAY_CHANGE, RunError, config_from_run, config_mismatches, read_run_meta

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if args.text is not None:  # the language model on the user's corpus
        if _explicit_train_options(args).get("dataset", "text") != "text":
            parser.error(f"--text trains the character language model (dataset text); drop --dataset "
                         f"{args.dataset}")
        args.dataset, args.dataset_options = "text", {"path": args.text}
    data_dir = None if args.data_dir is None else str(Path(args.data_dir).expanduser().resolve())
    if data_dir is not None and args.resume is None:
        from .data import DATASETS
        from .data.events import EventDataset

        if not issubclass(DATASETS[args.dataset], EventDataset):
            readers = ", ".join(k for k, v in sorted(DATASETS.items()) if issubclass(v, EventDataset))
            parser.error(f"--data-dir is for the datasets read from files ({readers}); dataset "
                         f"{args.dataset!r} needs none")
        args.dataset_options = {**(getattr(args, "dataset_options", None) or {}), "data_dir": data_dir}
        if args.model == "csnn" and getattr(DATASETS[args.dataset], "sensor", None) is not None:
            args.dataset_options["frames"] = True  # nmnist / dvs-gesture as frames (tonic's ToFrame)
    device = args.device
    if args.resume is not None:
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            parser.error(f"--resume continues the run in {args.resume!r}; drop --out {args.out!r}")
        out = Path(args.resume)
        try:
            saved = config_from_run(out)
            if device is None:
                device = str(read_run_meta(out).get("device", "cpu")).split(":")[0]
        except RunError as e:
            parser.fail(str(e), 2)
        given = {k: v for k, v in _explicit_train_options(args).items() if k in fields}
        try:
            config = dataclasses.replace(saved, **given)
            if data_dir is not None:  # the run's files moved: same data, another folder
                config = dataclasses.replace(config, dataset_options={**(config.dataset_options or {}),
                                                                      "data_dir": data_dir})
        except ValueError as e:
            parser.error(str(e).replace("TrainConfig: ", ""))
        diffs = config_mismatches(saved, config, RESUME_MAY_CHANGE)
        if diffs:
            flags = ", ".join("--" + d.split(":")[0].replace("_", "-") for d in diffs)
            parser.fail(f"{flags} {'does' if len(diffs) == 1 else 'do'} not match the run in {str(out)!r} "
                        f"({'; '.join(diffs)}); drop {'it' if len(diffs) == 1 else 'them'} to continue the run "
                        "as it was, or start a new run with --out", 2)
    else:
        try:
            config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
        except ValueError as e:  # a value valid alone but not with this model (--threshold with gru)
            parser.error(str(e).replace("TrainConfig: ", ""))
        out = default_out_dir() if args.out is None else Path(args.out)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None  # like Ctrl-C
    try:
        train(config, out, progress=not args.no_progress, resume=args.resume is not None,
              device=device or "cpu")
    except (FileExistsError, BudgetError, RunError) as e:
        parser.fail(str(e), 2)
    except (FloatingPointError, DiskSpaceError) as e:
        parser.fail(str(e))
    except (ValueError, OSError) as e:  # a bad device, an unreadable dataset file, a full disk
        parser.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt as e:
        parser.fail(*_interrupted(e, out))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


def main(argv: "list[str] | None" = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Usage errors (unknown flags, bad values, a bad --strategy string, a --resume folder that is
    not a run or whose config differs, a damaged checkpoint) exit with status 2 and a one-line
    message on stderr; errors while running (a NaN loss or gradient, a missing file, a full disk)
    with status 1; Ctrl-C with 130 and SIGTERM (while training) with 143; never a traceback.
    """
    from .console import restore_interrupts

    restore_interrupts()  # Ctrl-C is a KeyboardInterrupt again, caught below (see sparsebptt.console)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        return args.run(args, args.subparser)
    except KeyboardInterrupt as e:  # before or after a command's own handling (start-up, imports)
        what, status = _interrupted(e)
        print(f"sparsebptt: {what}", file=sys.stderr)
        return status

"""The ``sparsebptt`` command line: ``sparsebptt train [options]`` (also ``python -m sparsebptt``)."""
from __future__ import annotations

import argparse

__all__ = ["main", "build_parser"]


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


def _strategy(text: str) -> str:
    from .strategies import parse_strategy

    try:
        return parse_strategy(text).to_string()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .train import TrainConfig

    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="sparsebptt",
        description="Memory- and compute-sparse backpropagation through time for spiking and "
                    "recurrent networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    t = sub.add_parser(
        "train", help="train a spiking classifier under a memory strategy",
        description="Train a stack of LIF layers (spike counts -> linear readout) with Adam, "
                    "writing config.json and metrics.jsonl into the run folder.")
    t.add_argument("--dataset", default=d.dataset, choices=sorted(DATASETS),
                   help="dataset name (default: %(default)s)")
    t.add_argument("--T", type=_positive_int, default=d.T, help="time steps per example (default: %(default)s)")
    t.add_argument("--epochs", type=_positive_int, default=d.epochs, help="passes over the training split (default: %(default)s)")
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="examples per step (default: %(default)s)")
    t.add_argument("--hidden", type=_positive_int, default=d.hidden, help="LIF neurons per layer (default: %(default)s)")
    t.add_argument("--lr", type=_positive_float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    t.add_argument("--strategy", type=_strategy, default=d.strategy,
                   help="memory strategy: full, checkpoint:EVERY, revolve:SLOTS, ... (default: %(default)s)")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and of every batch (default: %(default)s)")
    t.add_argument("--threads", type=_positive_int, default=d.threads,
                   help="torch intra-op threads while training (default: %(default)s)")
    t.add_argument("--out", default=None, metavar="DIR", help="run folder (default: runs/<timestamp>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars, one line per epoch")
    t.set_defaults(run=_cmd_train, subparser=t)
    return parser


def _cmd_train(args, parser) -> int:
    from .train import TrainConfig, train

    config = TrainConfig(dataset=args.dataset, T=args.T, epochs=args.epochs, batch_size=args.batch_size,
                         hidden=args.hidden, lr=args.lr, strategy=args.strategy, seed=args.seed,
                         threads=args.threads)
    try:
        train(config, args.out, progress=not args.no_progress)
    except FileExistsError as e:
        parser.error(str(e))
    return 0


def main(argv: "list[str] | None" = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Usage errors (unknown flags, bad values, a bad --strategy string) exit with status 2 and a
    one-line message, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, args.subparser)

"""sparsebptt: memory- and compute-sparse backpropagation through time for RNNs and SNNs.

    import sparsebptt as sb
    cell = sb.cells.LIF(64, 256)
    y, state = sb.scan(cell, x, strategy=sb.Checkpoint(every=32))
"""
from . import console  # first: in the `sparsebptt` command, Ctrl-C during the imports below is one line
from . import cells, kernels
from .kernels import get_backend, set_backend
from .scan import REDUCES, RecomputationError, scan
from .sources import SegmentSource
from .strategies import (Checkpoint, DoubleCheckpoint, FullBPTT, Revolve, Skipper, Strategy,
                         TwoLevelRevolve, parse_strategy)
from .planner import estimate, parse_bytes, plan
from .trace import Trace, trace
from .nn import Recurrent
from . import adapters
from .nir import export_nir, import_nir

__version__ = "0.1.0"


def __getattr__(name: str):
    """``sb.fit`` (the trainer, `sparsebptt.train.fit.fit`), imported on first use: the training
    stack (data, tqdm) stays out of ``import sparsebptt``."""
    if name == "fit":
        from .train.fit import fit

        return fit
    raise AttributeError(f"module 'sparsebptt' has no attribute {name!r}")

__all__ = ["cells", "kernels", "adapters", "get_backend", "set_backend", "scan", "REDUCES", "SegmentSource", "Checkpoint",
           "DoubleCheckpoint", "FullBPTT", "Revolve", "Skipper", "TwoLevelRevolve", "Strategy",
           "parse_strategy", "RecomputationError", "plan", "estimate", "parse_bytes", "Trace", "trace",
           "Recurrent", "export_nir", "import_nir", "fit", "__version__"]

"""Reference cells: each one a pure ``<cell>_step`` function and an ``nn.Module`` with the protocol."""
from .base import Cell, linear
from .delta import DeltaGRU, DeltaLSTM, delta_gru_step, delta_lstm_step
from .egru import EGRU, activity_regularizer, egru_step, event_statistics
from .gru import GRU, gru_step
from .lif import LIF, LIFNeuron, LIFParams, lif_step
from .lstm import LSTM, lstm_step
from .stack import Stack
from .surrogate import SURROGATES, spike
from ..kernels.sparse import sparse_linear  # a kernel (the sparse matmul), importable here as before

__all__ = ["Cell", "linear", "DeltaGRU", "DeltaLSTM", "delta_gru_step", "delta_lstm_step", "EGRU",
           "activity_regularizer", "egru_step", "event_statistics", "GRU",
           "gru_step", "LIF", "LIFNeuron", "LIFParams", "lif_step", "LSTM", "lstm_step", "sparse_linear", "Stack",
           "SURROGATES", "spike"]

"""Reference cells: each one a pure ``<cell>_step`` function and an ``nn.Module`` with the protocol."""
from .base import Cell, linear
from .gru import GRU, gru_step
from .lif import LIF, LIFParams, lif_step
from .lstm import LSTM, lstm_step
from .stack import Stack
from .surrogate import SURROGATES, spike

__all__ = ["Cell", "linear", "GRU", "gru_step", "LIF", "LIFParams", "lif_step", "LSTM", "lstm_step",
           "Stack", "SURROGATES", "spike"]

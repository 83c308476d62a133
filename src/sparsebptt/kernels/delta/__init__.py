"""Delta GRU / Delta LSTM recurrence kernels: `naive.naive_recurrent_delta_gru` /
`naive.naive_recurrent_delta_lstm` (reference loops over the cell steps) and
`triton.fused_recurrent_delta_gru` / `triton.fused_recurrent_delta_lstm` (Triton, GPU).
All take the input sequence [L, B, I] and the cell's state tuple."""
from .naive import naive_recurrent_delta_gru, naive_recurrent_delta_lstm

__all__ = ["naive_recurrent_delta_gru", "naive_recurrent_delta_lstm"]

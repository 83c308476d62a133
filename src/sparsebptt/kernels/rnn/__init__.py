"""Fused GRU and LSTM segments: `cpu.fused_gru_layer` and `cpu.fused_lstm_layer` (C gate math,
batched projections, hand-written backward), equal to `naive.naive_gru` / `naive.naive_lstm`
(plain loops over `sparsebptt.cells.gru.gru_step` / `sparsebptt.cells.lstm.lstm_step`). Import each
by its module path: this package imports none of them (``naive`` imports the cells)."""

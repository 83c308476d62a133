"""Fused GRU and LSTM segments: `cpu.fused_gru_layer` and `cpu.fused_lstm_layer` (C gate math,
batched projections, hand-written backward). The references are `sparsebptt.cells.gru` / `lstm`."""

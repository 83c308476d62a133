"""Delta GRU / Delta LSTM recurrence kernels: `naive.naive_recurrent_delta_gru` /
`naive.naive_recurrent_delta_lstm` (reference loops over the cell steps), `cpu.delta_update`
(the "cpu" backend's sparse delta-memory update; Delta cells run it step by step) and
`triton.fused_recurrent_delta_gru` / `triton.fused_recurrent_delta_lstm` (Triton, GPU).
The segment kernels take the input sequence [L, B, I] and the cell's state tuple.
(``naive`` is not imported here: it imports the cells.)"""

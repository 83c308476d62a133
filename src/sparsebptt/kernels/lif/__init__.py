"""LIF recurrence kernels: `naive.naive_recurrent_lif` (the reference loop), `cpu.fused_lif_layer`,
`cpu.fused_recurrent_lif` and `cpu.fused_recurrent_lif_layer` (C, CPU), `triton.fused_recurrent_lif`
and `triton.fused_recurrent_lif_layer` (Triton, GPU); `function` holds what the fast paths share.
Import each by its module path: this package imports none of them (``naive`` imports the cells,
which import the kernels)."""

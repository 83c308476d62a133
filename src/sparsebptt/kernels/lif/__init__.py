"""LIF recurrence kernels: `naive.naive_recurrent_lif` (reference loop), `cpu.fused_recurrent_lif`
(C, CPU) and `triton.fused_recurrent_lif` (Triton, GPU). All take input currents [L, B, H]."""
from .naive import naive_recurrent_lif

__all__ = ["naive_recurrent_lif"]

"""EGRU recurrence kernels: `naive.naive_egru` (the reference loop over the cell step),
`cpu.fused_recurrent_egru` (event-sparse products, C kernels for the backward; the "cpu"
backend) and `triton.fused_recurrent_egru` (Triton, GPU). All take the input sequence [L, B, I]
and the state ``(c, y)`` or ``(c, y, n)``. (``naive`` is not imported here: it imports the cell.)"""

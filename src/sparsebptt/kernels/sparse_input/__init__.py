"""Sparse-input products (a mostly-zero input: spikes, events, one-hot tokens): `cpu.SparseRows`,
`cpu.SparseRoute` (C, CPU). Import them by their module path."""

"""EGRU's sparse-backward kernels (`cpu.py`); the reference is `sparsebptt.cells.egru`."""

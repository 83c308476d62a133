"""EGRU's fast paths: the sparse-backward CPU kernels (`cpu.py`) and the Triton GPU kernels
(`triton.py`); the reference is `sparsebptt.cells.egru`."""

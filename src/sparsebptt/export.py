"""Renamed: NIR export and import live in `sparsebptt.nir` (``sb.export_nir``, ``sb.import_nir``).
This module re-exports them, with a DeprecationWarning, for code written against ``sparsebptt.export``."""
import warnings

from .nir import SUBTRACT_RESETS, export_nir, import_nir, run_nir

warnings.warn("sparsebptt.export is now sparsebptt.nir (sb.export_nir, sb.import_nir); import from there",
              DeprecationWarning, stacklevel=2)

__all__ = ["export_nir", "import_nir", "run_nir", "SUBTRACT_RESETS"]

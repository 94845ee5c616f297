"""``medslim sweep``: a grid of compress → fine-tune → evaluate cells with their controls."""
from medslim.sweep.grid import Cell, SweepSpec, expand, load_sweep
from medslim.sweep.runner import run_sweep

__all__ = ["Cell", "SweepSpec", "expand", "load_sweep", "run_sweep"]

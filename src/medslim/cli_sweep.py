"""``medslim sweep``: a thin shell over :func:`medslim.sweep.run_sweep`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medslim.cli_common import console, out_console


def sweep(
    sweep_file: Path = typer.Argument(..., help="sweep YAML (see configs/sweep/)"),
    output: Path = typer.Option(..., "-o", "--output", help="sweep folder (created; an existing one is resumed)"),
    executor: str = typer.Option("ray", "--executor", help="ray (one task per cell) | local (in this process)"),
    address: Optional[str] = typer.Option(None, "--address", help="an existing Ray cluster (default: a local instance)"),
    cpus_per_cell: float = typer.Option(2, "--cpus-per-cell", help="Ray CPUs per cell (= all cores here: one heavy job at a time)"),
    only: Optional[list[str]] = typer.Option(None, "--only", help="run only cells whose id has these __-separated parts, e.g. s1, control__s2, criterion-hvs (repeatable)"),
    max_cells: Optional[int] = typer.Option(None, "--max-cells", help="stop after this many cells (resume later)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and whether they are finished; run nothing"),
) -> None:
    """Compress → fine-tune (stock nnUNetv2_train) → predict → evaluate every cell of a grid,
    with the controls (original, original + same fine-tune, the small architecture from
    scratch at the same and the full budget). Finished cells are never recomputed."""
    from medslim.sweep import load_sweep, run_sweep
    from medslim.sweep.cell import RESULT
    from medslim.sweep.runner import plan_cells

    spec = load_sweep(sweep_file)
    if dry_run:
        folder = output.expanduser().resolve()
        cells, todo = plan_cells(spec, folder, only or ())
        pending = {c.id for c in todo}
        for cell in cells:
            done = (folder / "cells" / cell.id / RESULT).is_file()
            status = "finished" if done else "pending " if cell.id in pending else "left out"  # by --only
            out_console.print(f"{status}  {cell.id}")
        out_console.print(f"{len(cells)} cells, {len(pending)} to run")
        return
    summary = run_sweep(spec, output.expanduser(), executor=executor, address=address, cpus_per_cell=cpus_per_cell,
                        only=only or (), max_cells=max_cells, console=console)
    out_console.print(f"{summary['ran']} cell(s) run, {summary['finished_before']} finished before, "
                      f"{len(summary['failed'])} failed; results in {output}")
    if summary["failed"]:
        raise typer.Exit(1)

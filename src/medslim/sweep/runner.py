"""``medslim sweep``: run every unfinished cell of a sweep, one cell = one Ray task.

Resumable: a cell with a ``result.json`` is never run again (a changed definition of a
finished cell is refused rather than silently mixed); a failed cell keeps its
``error.json`` until it is retried by the next run, and the other cells go on.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medslim.errors import MedslimError
from medslim.sweep.cell import DEFINITION, RESULT, Trainer, cell_dir, run_cell_safe, train_cell, write_json
from medslim.sweep.data import SweepContext, prepare
from medslim.sweep.grid import Cell, SweepSpec, expand

EXECUTORS = ("ray", "local")
# the compressed cells first: they answer the sweep's question; the controls then bound it
RUN_ORDER = ("original", "compressed", "control", "scratch", "scratch_full")


def matches(cell_id: str, pattern: str) -> bool:
    """Whether ``pattern`` names whole ``__``-separated parts of ``cell_id``, in a row:
    ``s1`` or ``control__s1`` select ``control__s1`` but not ``control__s12345``; ``criterion-hvs``
    does not select ``criterion-hvs_data``."""
    parts, wanted = cell_id.split("__"), [p for p in pattern.split("__") if p]
    return bool(wanted) and any(parts[i:i + len(wanted)] == wanted for i in range(len(parts)))


def plan_cells(spec: SweepSpec, sweep_dir: Path, only: Sequence[str] = ()) -> tuple[list[Cell], list[Cell]]:
    """(all cells, the ones still to run). ``only``: patterns (see ``matches``) of cell ids to restrict to.

    Raises:
        MedslimError: a finished cell was defined differently (another sweep file in this folder).
    """
    cells = expand(spec)
    todo = []
    for cell in cells:
        folder = sweep_dir / "cells" / cell.id
        if (folder / DEFINITION).is_file():
            old = json.loads((folder / DEFINITION).read_text())
            # what was run must not change; labels (method) may be renamed
            if (old["kind"], old["settings"]) != (cell.kind, cell.settings) and (folder / RESULT).is_file():
                raise MedslimError(f"cell {cell.id} in {sweep_dir} was run with other settings; "
                                   "use a new sweep folder for a changed sweep file")
        if not (folder / RESULT).is_file() and (not only or any(matches(cell.id, o) for o in only)):
            todo.append(cell)
    return cells, todo


def run_sweep(spec: SweepSpec, sweep_dir: str | Path, *, executor: str = "ray", address: str | None = None,
              cpus_per_cell: float = 2, only: Sequence[str] = (), max_cells: int | None = None,
              train: Trainer = train_cell, console: Console | None = None) -> dict[str, Any]:
    """Run the unfinished cells of ``spec`` into ``sweep_dir``.

    Args:
        executor: ``ray`` (a local Ray instance, or the cluster at ``address``) or ``local``
            (in this process, one cell after another).
        cpus_per_cell: Ray CPUs per task (2 on a 2-core machine: one cell at a time).
        only: run only cells whose id ``matches`` one of these patterns.
        max_cells: stop after this many cells (the rest stays pending for the next run).
        train: the fine-tune of a cell (``local`` only; Ray tasks use ``train_cell``).
    Returns:
        ``{"cells": n, "finished_before": n, "ran": n, "failed": [ids]}``.
    """
    if executor not in EXECUTORS:
        raise MedslimError(f"unknown executor '{executor}'; choose one of {', '.join(EXECUTORS)}")
    sweep_dir = Path(sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    cells, todo = plan_cells(spec, sweep_dir, only)
    finished_before = sum((sweep_dir / "cells" / c.id / RESULT).is_file() for c in cells)
    ctx = prepare(spec, sweep_dir)
    write_json(sweep_dir / "sweep.json", spec.to_dict())
    for cell in cells:
        folder = cell_dir(ctx, cell)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / DEFINITION, cell.to_dict())
    todo = sorted(todo, key=lambda c: RUN_ORDER.index(c.kind))  # stable: grid order within a kind
    todo = todo[:max_cells] if max_cells is not None else todo
    failed: list[str] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console or Console(stderr=True)) as bar:
        task = bar.add_task("sweep", total=len(todo))

        def done(result: dict[str, Any]) -> None:
            if result["status"] != "ok":
                failed.append(result["cell"]["id"])
                bar.console.print(f"cell {result['cell']['id']} failed: {result['error']}", markup=False)
            bar.update(task, advance=1, description=result["cell"]["id"])

        if executor == "local":
            for cell in todo:
                done(run_cell_safe(cell, ctx, train))
        else:
            _run_ray(todo, ctx, address, cpus_per_cell, done)
    return {"cells": len(cells), "finished_before": finished_before, "ran": len(todo), "failed": failed}


def _run_ray(todo: list[Cell], ctx: SweepContext, address: str | None, cpus_per_cell: float,
             done: Callable[[dict[str, Any]], None]) -> None:
    """One Ray task per cell; results are reported as they finish."""
    if not todo:
        return
    try:
        import ray
    except ImportError:
        raise MedslimError("medslim sweep runs cells on Ray: pip install 'medslim[sweep]' "
                           "(or --executor local)") from None
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": os.cpu_count()}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    try:
        task = ray.remote(num_cpus=cpus_per_cell, max_retries=0)(run_cell_safe)
        pending = {task.remote(cell, ctx): cell for cell in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                done(ray.get(ref))
    finally:
        if started:
            ray.shutdown()

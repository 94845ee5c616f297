"""Channel importance criteria. Scoring never modifies the model.

``get_criterion(name)(model, layers, ctx) -> {layer: [C_out] scores}``; see ``list_criteria()``.
"""
from medslim.score import baselines, hvs, norton, relief, taylor  # noqa: F401  (register the criteria)
from medslim.score.propagate import Propagation, find_head, propagate
from medslim.score.registry import (CRITERIA, NEEDS_CALIBRATION, Criterion, ScoreContext, check_criterion,
                                    get_criterion, list_criteria, register_criterion)

__all__ = ["CRITERIA", "NEEDS_CALIBRATION", "Criterion", "Propagation", "ScoreContext", "check_criterion",
           "find_head", "get_criterion", "list_criteria", "propagate", "register_criterion"]

"""Tucker-2 decomposition of convolutions (SPEC §1): factors, rank policies, whole networks;
and NORTON's per-filter CP decomposition (``cp``, ``cp_apply``).

Importing this package registers every rank policy (``ranks``: df, energy; ``budget_ranks``:
latency, budget; ``vbmf``: vbmf)."""
from medslim.decompose.apply import (DecompositionRecord, LayerRecord, apply_ranks, decompose_network,
                                     eligible_convs, stem_name, tucker_params)
from medslim.decompose.cp import CPDConv, CPFactors, cp_filter_factors
from medslim.decompose.cp_apply import apply_cp, decompose_network_cp
from medslim.decompose import budget_ranks, vbmf  # noqa: F401  (registers latency, budget, vbmf)
from medslim.decompose.ranks import RANK_POLICIES, get_rank_policy, register_rank_policy
from medslim.decompose.tucker import Tucker2Factors, TuckerConv, tucker2_factors

__all__ = [
    "CPDConv", "CPFactors", "apply_cp", "cp_filter_factors", "decompose_network_cp",
    "DecompositionRecord", "LayerRecord", "RANK_POLICIES", "Tucker2Factors", "TuckerConv", "apply_ranks",
    "decompose_network", "eligible_convs", "get_rank_policy", "register_rank_policy", "stem_name",
    "tucker2_factors", "tucker_params",
]

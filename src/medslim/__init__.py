"""medslim: Tucker-2 decomposition and HVS channel pruning for nnU-Net and MONAI models."""
from medslim.errors import MedslimError
from medslim.spec import CompressionSpec, LayerRanks

__all__ = ["CompressionSpec", "LayerRanks", "MedslimError"]
__version__ = "0.1.0"

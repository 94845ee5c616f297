"""Write compressed models where users' tools load them."""
from medslim.export.nnunet_folder import write_results_folder

__all__ = ["write_results_folder"]

"""lcsc_fast: fast Linear Combination of Saved Checkpoints (LCSC) for diffusion and consistency models.

The engine merges sum_i w_i theta_i over hundreds of checkpoints in one fused native pass,
straight into a model's parameter buffers.
"""

__version__ = "0.1.0"

from . import coefficients, metrics
from .engine import MergePlan, build_info, merge_into, weighted_sum, weighted_sum_batched
from .lora import LoraPlan, lora_weighted_sum
from .pack import pack
from .recorder import Recorder
from .safetensors_io import CheckpointError
from .search import SearchResult, search
from .trajectory import Trajectory

__all__ = [
    "__version__", "CheckpointError", "LoraPlan", "MergePlan", "Recorder", "SearchResult",
    "Trajectory", "build_info", "coefficients", "lora_weighted_sum", "merge_into", "metrics",
    "pack", "search", "weighted_sum", "weighted_sum_batched",
]

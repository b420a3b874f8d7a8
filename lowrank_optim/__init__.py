"""lowrank-optim: memory-efficient optimizers for LLM pretraining."""
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from .apollo import APOLLOAdamW, APOLLOMini
from .clipping import clip_grad_norm_
from .dct_adam import DCTAdamW, DCTProjAdam
from .galore import GaLoreAdamW, GaLoreAdamW8bit
from .param_groups import lowrank_param_groups
from .registry import available_optimizers, create_optimizer, register_optimizer
from .sltrain import SLTrainLinear, convert_to_sltrain, merge_sltrain
from .sst import SSTAdamW, SSTLinear, convert_to_sst, merge_sst, sst_layers
from .state_bytes import optimizer_state_bytes

try:
    __version__ = _version("lowrank-optim")
except _PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "APOLLOAdamW", "APOLLOMini", "DCTAdamW", "DCTProjAdam", "GaLoreAdamW", "GaLoreAdamW8bit", "lowrank_param_groups",
    "available_optimizers",
    "create_optimizer", "register_optimizer", "optimizer_state_bytes", "clip_grad_norm_",
    "SLTrainLinear", "convert_to_sltrain", "merge_sltrain",
    "SSTAdamW", "SSTLinear", "convert_to_sst", "merge_sst", "sst_layers",
]

"""fastpeft: fused kernels for LoRA, QLoRA, DoRA, IA3, DiffPruning and multi-LoRA serving, as drop-in PyTorch modules.

Importing fastpeft touches no GPU, compiles nothing, and imports neither triton, transformers, peft
nor bitsandbytes; each is imported where it is first needed.
"""

from . import reference
from .nf4 import NF4Weight
from .ops import nf4_dequantize, dora_linear, ia3_linear, lora_linear
from .nn import DiffPruneLinear, DoraLinear, IA3Linear, LoraLinear
from .adapters import Adapter, load_adapter, save_adapter
from .serving import MultiLoraModel
from .integration.accelerate import accelerate, restore
from .integration.adapter_files import load_model_adapter, save_model_adapter
from .integration.inject import inject
from .integration.multi_adapter_training import train_adapters
from .integration.summary import PatchSummary, print_trainable_parameters, trainable_parameters
from . import diffprune

__version__ = "0.1.0"

__all__ = ["Adapter", "load_adapter", "save_adapter", "MultiLoraModel", "NF4Weight", "nf4_dequantize",
           "LoraLinear", "lora_linear", "DoraLinear", "dora_linear", "IA3Linear", "ia3_linear", "reference", "__version__",
           "PatchSummary", "accelerate", "restore", "inject", "save_model_adapter", "load_model_adapter",
           "trainable_parameters", "print_trainable_parameters", "DiffPruneLinear", "diffprune", "train_adapters"]

"""fastpeft's torch.nn modules. They call fastpeft.ops and know nothing of Triton."""

from .lora import LoraLinear
from .dora import DoraLinear
from .diffprune import DiffPruneLinear
from .ia3 import IA3Linear
from .multi_lora import MultiLoraBatch, MultiLoraLinear

__all__: list[str] = ["LoraLinear", "DoraLinear", "DiffPruneLinear", "IA3Linear", "MultiLoraBatch", "MultiLoraLinear"]

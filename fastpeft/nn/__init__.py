"""fastpeft's torch.nn modules. They call fastpeft.ops and know nothing of Triton."""

from .lora import LoraLinear
from .multi_lora import MultiLoraBatch, MultiLoraLinear

__all__: list[str] = ["LoraLinear", "MultiLoraBatch", "MultiLoraLinear"]

"""Ops: the device primitives (``fused_linear``, ``nf4_dequantize``, ``multi_lora_add_``, and the multi-adapter
backward's ``multi_lora_shrink`` / ``multi_lora_segment_grad``: ``torch.library`` ops with a Triton kernel for CUDA
and a ``fastpeft.reference`` kernel for CPU) and the autograd-aware layer ops composed of them (``lora_linear``,
``dora_linear``, ``ia3_linear``)."""

from .dispatch import backend_for, requested_backend, triton_interpreter
from .fused_linear import fused_linear
from .nf4_dequantize import nf4_dequantize
from .multi_lora import MultiLoraMeta, multi_lora_add_
from .multi_lora_grad import multi_lora_segment_grad, multi_lora_shrink
from .lora import lora_linear
from .dora import dora_linear, dora_weight_norm
from .ia3 import ia3_linear

__all__ = ["backend_for", "requested_backend", "triton_interpreter", "fused_linear", "nf4_dequantize",
           "MultiLoraMeta", "multi_lora_add_", "multi_lora_shrink", "multi_lora_segment_grad", "lora_linear",
           "dora_linear", "dora_weight_norm", "ia3_linear"]

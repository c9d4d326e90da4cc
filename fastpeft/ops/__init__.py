"""Ops: autograd-aware entry points that dispatch to the Triton kernels or the reference."""

from .dispatch import backend_for, requested_backend, triton_interpreter
from .nf4 import dequantize_nf4
from .multi_lora import MultiLoraMeta, multi_lora_add_
from .lora import lora_linear, nf4_lora_matmul
from .dora import dora_linear, dora_weight_norm
from .ia3 import ia3_linear, ia3_matmul
from .sparse_delta import sparse_delta_add_, sparse_delta_linear

__all__ = ["backend_for", "requested_backend", "triton_interpreter", "dequantize_nf4", "MultiLoraMeta", "multi_lora_add_", "lora_linear",
           "nf4_lora_matmul", "dora_linear", "dora_weight_norm", "ia3_linear", "ia3_matmul",
           "sparse_delta_add_", "sparse_delta_linear"]

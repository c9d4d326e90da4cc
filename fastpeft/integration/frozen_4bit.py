"""The bitsandbytes 4-bit layers of a model on fastpeft's NF4 op: every NF4 ``Linear4bit`` no PEFT layer wraps (the
frozen bases under prompt / prefix / P-tuning, BitFit, LoRA on some modules only), and the 4-bit base of an
adapted layer whenever PEFT's forward calls it, run :func:`frozen_4bit_linear` instead of bitsandbytes' forward
where it computes what that forward would; a call bitsandbytes multiplies with its own CPU kernel runs that
kernel (:func:`bnb_cpu_kernel_linear`, with the input gradient the kernel lacks).
:func:`~fastpeft.accelerate` switches them (``frozen_4bit=True``, the default) through
:func:`accelerate_frozen_4bit`."""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..nn.lora import is_bnb_linear4bit, bnb_runs_its_cpu_kernel, cached_nf4_view, parameter
from ..ops.compile_compat import fresh_output_when_compiling
from ..ops.lora import lora_linear
from ..ops.nf4_dequantize import nf4_dequantize
from .fused_forward import base_reason
from .layer_classes import fast_class, is_accelerated
from .summary import PatchSummary

__all__ = ["accelerate_frozen_4bit", "frozen_4bit_linear", "bnb_cpu_kernel_linear"]


def accelerate_frozen_4bit(model: nn.Module, inside_peft_layers: set, enabled: bool, summary: PatchSummary) -> None:
    """Switch (or, not ``enabled``, switch back) every bitsandbytes ``Linear4bit`` of the model. Those no PEFT layer
    wraps are reported (kind ``nf4``, or skipped with the reason); the base layer of a PEFT layer is not a layer
    of its own to the user: switched silently, it serves PEFT's forward whenever that runs (a call the fused op
    does not take: another compute dtype, disabled adapters, hooks), as bitsandbytes' forward would."""
    if "bitsandbytes" not in sys.modules:  # a model with 4-bit layers has imported bitsandbytes already
        return
    for name, module in model.named_modules():
        if not is_bnb_linear4bit(module):
            continue
        original = module._fastpeft_peft_class if is_accelerated(module) else type(module)
        if not enabled:
            module.__class__ = original
            continue
        reported = id(module) not in inside_peft_layers
        reason = base_reason(module)
        if reason is not None:
            module.__class__ = original
            if reported:
                summary.skipped[name] = reason
            continue
        module.__class__ = fast_class(original, "nf4", _frozen_4bit_forward)
        if reported:
            summary.replaced[name] = "nf4"


def _frozen_4bit_forward(self, x, *args, **kwargs):
    """The forward of a bitsandbytes ``Linear4bit`` no PEFT layer wraps, switched by :func:`~fastpeft.accelerate`:
    :func:`frozen_4bit_linear` where it computes what bitsandbytes' forward would, else
    that forward (extra arguments, autocast; a call bitsandbytes multiplies with its own CPU kernel through
    :func:`bnb_cpu_kernel_linear`, which adds the gradient bitsandbytes' kernel lacks)."""
    if args or kwargs:
        return self._fastpeft_peft_class.forward(self, x, *args, **kwargs)
    if bnb_runs_its_cpu_kernel(self, x):
        return bnb_cpu_kernel_linear(self, x)
    if torch.is_autocast_enabled(x.device.type) or base_reason(self) is not None:
        return self._fastpeft_peft_class.forward(self, x)
    return frozen_4bit_linear(self, x)


def frozen_4bit_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``bitsandbytes.nn.Linear4bit.forward`` on fastpeft's NF4 op (for an NF4 weight in bitsandbytes' layout):
    the same compute dtype rule (the layer's ``compute_dtype``, set from the first input when unset; the bias
    cast to it, in place as bitsandbytes does), output in the input's dtype; gradients for ``x`` and a
    trainable bias."""
    if not layer.compute_type_is_set:
        layer.set_compute_type(x)
        layer.compute_type_is_set = True
    input_dtype = x.dtype
    if layer.compute_dtype is not None:
        x = x.to(layer.compute_dtype)
    bias = layer.bias
    if bias is not None:
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)
        if layer.compute_dtype is not None:
            bias = bias.to(layer.compute_dtype)
    return lora_linear(x, cached_nf4_view(layer, layer.weight), bias, None, None, 0.0).to(input_dtype)


@fresh_output_when_compiling
class _BnbCpuKernelLinear(torch.autograd.Function):
    """bitsandbytes' own forward of a 4-bit layer it has repacked for its CPU kernel (that kernel's numbers,
    bit for bit), with the input gradient that forward lacks: the kernel has no backward, so bitsandbytes gives
    an input that requires grad none (torch warns that this is silently incorrect) and raises on a bias. Here
    ``dx = dy W``, ``W`` the weight the layer holds (its repacked layout read bit for bit), computed as
    bitsandbytes' own 4-bit backward does (the weight dequantised, in the compute dtype); a trainable bias gets
    ``dy`` summed over the rows."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer, ctx.input_dtype = layer, x.dtype
        out = type(layer)._fastpeft_peft_class.forward(layer, x)
        ctx.bias_dtype = None if bias is None else bias.dtype  # bitsandbytes may have cast it in place
        return out

    @staticmethod
    def backward(ctx, dy):
        layer = ctx.layer
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            weight = cached_nf4_view(layer, layer.weight)
            compute_dtype = dy.dtype if layer.compute_dtype is None else layer.compute_dtype
            dense = nf4_dequantize(weight, weight.dtype).to(compute_dtype)
            dx = (dy.to(compute_dtype) @ dense).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            dbias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, dbias, None


def bnb_cpu_kernel_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``bitsandbytes.nn.Linear4bit.forward`` for a call it multiplies with its own CPU kernel
    (:func:`~fastpeft.nn.lora.bnb_runs_its_cpu_kernel`): that forward itself, whose numbers no fused op gives; over
    a repacked layer, with an input or a bias that needs a gradient, through :class:`_BnbCpuKernelLinear`, which
    supplies the gradient bitsandbytes drops."""
    if torch.is_grad_enabled():
        bias = parameter(layer, "bias")
        if x.requires_grad or (bias is not None and bias.requires_grad):
            return _BnbCpuKernelLinear.apply(x, bias, layer)
    return type(layer)._fastpeft_peft_class.forward(layer, x)

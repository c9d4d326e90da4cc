"""``DiffPruneLinear``: DiffPruning (Guo, Rush, Kim, ACL 2021) on a frozen dense or NF4 linear layer.

The layer learns a diff ``δ`` on top of the frozen weight: ``y = x (W + δ)ᵀ + b``. It has two states.

**Training** (as built): ``δ = z ⊙ w`` with ``w`` (``diff_weight``, ``(out, in)``, fp32, initialised to 0)
and a hard-concrete gate ``z`` per entry with log-odds ``diff_log_alpha`` (``(out, in)``, fp32). In training mode
the gate is sampled at every call (``fastpeft.reference.hard_concrete_sample``, fresh uniform noise); in eval mode
it is the deterministic ``hard_concrete_eval``. :meth:`DiffPruneLinear.l0_penalty` is the expected number of
nonzero gates (``fastpeft.reference.expected_l0``). With ``structured`` each entry is gated a second time by the
gate of its group (the paper's structured DiffPruning: ``δ = z ⊙ z_group ⊙ w``, an entry nonzero when both gates
are): ``structured=True`` makes each weight matrix one group, as the paper does; ``structured=g`` (an int) makes
groups of ``g`` consecutive entries of a row (``in % g == 0``), ``diff_group_log_alpha`` ``(out, in / g)``.
The gated dense ``δ`` is materialised at every call, and so is the weight gradient ``(out, in)``: that is inherent
to DiffPruning's training, which learns every entry of the diff. A dense base runs ``F.linear(x, W + δ, b)``; an
NF4 base ``x Wᵀ + b`` through fastpeft's NF4 op (``W`` never dequantised in full) plus ``x δᵀ``.

**Projected** (after :meth:`DiffPruneLinear.project`, or built by :meth:`DiffPruneLinear.from_sparse_delta`): a
fixed-mask sparse diff, a :class:`~fastpeft.sparse_delta.SparseDelta` (CSR): the positions are buffers
(``delta_row_ptr`` int64 ``(out + 1,)``, ``delta_col_idx`` int32 ``(nnz,)``) and the values a trainable parameter
``delta_values`` (fp32 ``(nnz,)``) for the paper's short fine-tune with the mask fixed; ``w`` and the gates are
gone. The forward is ``fastpeft.ops.sparse_delta.sparse_delta_linear``: ``x Wᵀ + b + x δᵀ``.

Memory per base entry while training (fp32 state, AdamW): ``w`` 4 bytes + ``log_alpha`` 4, their gradients 4 + 4,
AdamW's two moments 8 + 8: 32 bytes, next to the base's 2 (bf16) or about 0.5 (NF4); per call the gated ``δ``
(4 bytes), the noise (4), ``W + δ`` in the input's dtype (dense base) and the weight gradient (4) besides. A
structured layer adds the same per group. After projection: ``nnz · (4 + 4)`` bytes (int32 column index, fp32
value) plus ``(out + 1) · 8`` for the row pointers; the fine-tune adds ``nnz · 12`` (gradient, two moments).

The constants default to the paper's (the defaults of the authors' released code): ``beta = 1`` (temperature),
``gamma = -1.5``, ``zeta = 1.5`` (stretch interval), ``log_alpha_init = 5`` (every gate starts open:
``P(z > 0) = σ(5 − log(1.5 / 1.5)) ≈ 0.993``).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..nf4 import NF4Weight
from ..ops.inputs import check_linear_inputs
from ..ops.lora import lora_linear
from ..ops.sparse_delta import sparse_delta_linear
from ..sparse_delta import SparseDelta
from .lora import frozen_base, LoraLinear, parameter

__all__ = ["DiffPruneLinear"]

# The uniform noise of a sampled gate is kept this far inside (0, 1), so that log u and log(1 - u) stay finite.
_NOISE_EPS = 1e-6


def check_gate_constants(beta: float, gamma: float, zeta: float, log_alpha_init: float) -> None:
    for label, value in (("beta", beta), ("gamma", gamma), ("zeta", zeta), ("log_alpha_init", log_alpha_init)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{label} must be a finite number, got {value!r}")
    if beta <= 0:
        raise ValueError(f"beta (the gate temperature) must be > 0, got {beta}")
    if not gamma < 0.0 < 1.0 < zeta:
        raise ValueError(f"the stretch interval needs gamma < 0 < 1 < zeta, got gamma={gamma}, zeta={zeta}")


class DiffPruneLinear(nn.Module):
    """DiffPruning on a frozen linear layer (see the module docstring).

    Args:
        base_layer: ``torch.nn.Linear`` (float weight), ``bitsandbytes.nn.Linear4bit`` (NF4, read in place) or an
            :class:`NF4Weight` (then ``bias`` may be given); kept as ``self.base_layer`` and frozen.
        structured: ``False`` (a gate per entry), ``True`` (and one gate for the whole matrix, the paper's groups)
            or an int ``g`` (and one gate per ``g`` consecutive entries of a row).
        beta, gamma, zeta: the hard-concrete temperature and stretch interval (``gamma < 0 < 1 < zeta``).
        log_alpha_init: the initial log-odds of every gate, group gates included.
    """

    def __init__(
        self,
        base_layer: Union[nn.Module, NF4Weight],
        structured: Union[bool, int] = False,
        *,
        beta: float = 1.0,
        gamma: float = -1.5,
        zeta: float = 1.5,
        log_alpha_init: float = 5.0,
        bias: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        check_gate_constants(beta, gamma, zeta, log_alpha_init)
        self._set_base(base_layer, bias)
        if structured is not False and structured is not True and (
                not isinstance(structured, int) or structured <= 0 or self.in_features % structured):
            raise ValueError(f"structured must be False, True or a group size dividing in_features="
                             f"{self.in_features}, got {structured!r}")
        self.structured = structured
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        device = self.base_weight().device
        shape = (self.out_features, self.in_features)
        self.diff_weight = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
        self.diff_log_alpha = nn.Parameter(torch.full(shape, float(log_alpha_init), device=device))
        if structured is False:
            self.register_parameter("diff_group_log_alpha", None)
        else:
            groups = (1, 1) if structured is True else (self.out_features, self.in_features // structured)
            self.diff_group_log_alpha = nn.Parameter(torch.full(groups, float(log_alpha_init), device=device))

    @classmethod
    def from_sparse_delta(cls, base_layer: Union[nn.Module, NF4Weight], delta: SparseDelta, *,
                          bias: Optional[torch.Tensor] = None) -> "DiffPruneLinear":
        """A projected layer holding ``delta`` (its shape must be the base's ``(out, in)``; its values become the
        trainable ``delta_values``, copied, fp32, on the base's device), without the training state."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._set_base(base_layer, bias)
        layer.structured = False
        layer.beta = layer.gamma = layer.zeta = None
        layer._set_sparse(delta)
        return layer

    def _set_base(self, base_layer, bias):
        base_layer = frozen_base(base_layer, bias)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def _set_sparse(self, delta: SparseDelta) -> None:
        if not isinstance(delta, SparseDelta):
            raise TypeError(f"delta must be a fastpeft.sparse_delta.SparseDelta, got {type(delta).__name__}")
        shape = (self.out_features, self.in_features)
        if tuple(delta.shape) != shape:
            raise ValueError(f"the sparse diff is {tuple(delta.shape)}, the layer's weight {shape}")
        device = self.base_weight().device
        delta = delta.to(device)
        self.register_buffer("delta_row_ptr", delta.row_ptr.clone())
        self.register_buffer("delta_col_idx", delta.col_idx.clone())
        self.delta_values = nn.Parameter(delta.values.detach().to(torch.float32).clone())
        for name in ("diff_weight", "diff_log_alpha", "diff_group_log_alpha"):
            self._parameters.pop(name, None)

    # LoraLinear's views of the base apply as they are (NF4 view of a Linear4bit, repacking check)
    base_weight = LoraLinear.base_weight
    bias = LoraLinear.bias
    base_tensors = LoraLinear.base_tensors
    is_nf4 = LoraLinear.is_nf4

    @property
    def projected(self) -> bool:
        """Whether the layer holds a fixed-mask sparse diff (after :meth:`project`)."""
        return "delta_values" in self._parameters

    # ------------------------------------------------------------------ gates
    def _per_entry(self, group_values: torch.Tensor) -> torch.Tensor:
        """Group values broadcast (``structured=True``: one value) or repeated to the entries of their group."""
        return group_values if self.structured is True else group_values.repeat_interleave(self.structured, dim=1)

    def _check_training_state(self, what: str) -> None:
        if self.projected:
            raise ValueError(f"{what}: this layer is projected (a fixed sparse diff); it has no gates")

    def gate(self, u: Optional[torch.Tensor] = None, group_u: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gate ``(out, in)`` (fp32) of this call: sampled in training mode, from the uniform noise ``u``
        (``diff_log_alpha``'s shape) and ``group_u`` (``diff_group_log_alpha``'s) where given, fresh noise
        otherwise; the deterministic gate in eval mode. With ``structured``, each entry's gate times its group's."""
        self._check_training_state("gate")
        log_alpha, group_log_alpha = parameter(self, "diff_log_alpha"), self.diff_group_log_alpha
        gate = self._hard_concrete(log_alpha, u, "u")
        if group_log_alpha is not None:
            gate = gate * self._per_entry(self._hard_concrete(group_log_alpha, group_u, "group_u"))
        elif group_u is not None:
            raise ValueError("group_u is for a structured layer; this one has no group gates")
        return gate

    def _hard_concrete(self, log_alpha: torch.Tensor, u: Optional[torch.Tensor], label: str) -> torch.Tensor:
        if not self.training:
            if u is not None:
                raise ValueError(f"{label} is noise for a sampled gate; in eval mode the gate is deterministic")
            return reference.hard_concrete_eval(log_alpha, self.gamma, self.zeta)
        if u is None:
            u = torch.rand(log_alpha.shape, device=log_alpha.device).clamp_(_NOISE_EPS, 1.0 - _NOISE_EPS)
        elif not isinstance(u, torch.Tensor) or u.shape != log_alpha.shape or not u.is_floating_point():
            raise ValueError(f"{label} must be a float tensor of shape {tuple(log_alpha.shape)}, got "
                             f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
        return reference.hard_concrete_sample(log_alpha, u.to(log_alpha), self.beta, self.gamma, self.zeta)

    def l0_penalty(self) -> torch.Tensor:
        """The expected number of nonzero diff entries (0-d fp32, differentiable in the log-odds; 0 once
        projected, where the count is fixed). Unweighted: :func:`fastpeft.diffprune.l0_penalty` applies
        ``l0_lambda``."""
        if self.projected:
            return self.delta_values.new_zeros(())
        group = self.diff_group_log_alpha
        return reference.expected_l0(self.diff_log_alpha, self.beta, self.gamma, self.zeta,
                                     None if group is None else self._per_entry(group))

    # ------------------------------------------------------------------ the diff
    # (row_ptr, col_idx, their in-place versions, SparseDelta) of the last pattern built from the buffers: the
    # SparseDelta caches tensors derived from the pattern (the transposed pattern of every backward), so it lives as
    # long as the buffers are the same tensors, unchanged (``.to()`` replaces them, ``load_state_dict`` writes them
    # in place: either builds and validates it again)
    _pattern: Optional[tuple] = None

    def _delta(self, values: torch.Tensor) -> SparseDelta:
        """The projected diff with ``values`` (``delta_values`` itself in the forward, so that it gets its gradient)."""
        row_ptr, col_idx = self._buffers["delta_row_ptr"], self._buffers["delta_col_idx"]
        pattern = self._pattern
        if (pattern is None or pattern[0] is not row_ptr or pattern[1] is not col_idx
                or pattern[2] != (row_ptr._version, col_idx._version)):
            delta = SparseDelta(row_ptr, col_idx, values.detach(), (self.out_features, self.in_features)).validate()
            pattern = self._pattern = (row_ptr, col_idx, (row_ptr._version, col_idx._version), delta)
        return pattern[3].with_values(values)

    @property
    def sparse_delta(self) -> SparseDelta:
        """The projected diff as a :class:`SparseDelta` sharing this layer's tensors (values: ``delta_values``,
        detached)."""
        if not self.projected:
            raise ValueError("this layer is not projected yet: fastpeft.diffprune.project(model) makes the sparse diff")
        return self._delta(self.delta_values.detach())

    def delta_weight(self) -> torch.Tensor:
        """The diff ``δ`` as a dense ``(out, in)`` fp32 tensor, detached: the projected sparse diff, or before
        projection the deterministic gate times ``w`` (what eval mode adds and what :meth:`project` ranks)."""
        if self.projected:
            return self.sparse_delta.to_dense(torch.float32)
        with torch.no_grad():
            training = self.training
            self.train(False)
            try:
                return self.gate() * self.diff_weight
            finally:
                self.train(training)

    @torch.no_grad()
    def project(self, mask: torch.Tensor) -> None:
        """Keep the entries of :meth:`delta_weight` where the boolean ``mask`` ``(out, in)`` is True as a fixed
        sparse diff (their values the trainable ``delta_values``); drop ``w`` and the gates."""
        self._check_training_state("project")
        shape = (self.out_features, self.in_features)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
            raise ValueError(f"mask must be a bool tensor of shape {shape}, got "
                             f"{(mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else mask!r}")
        delta = self.delta_weight()
        self._set_sparse(SparseDelta.from_dense(delta, mask.to(delta.device)))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base_tensors()
        if self.projected:
            return sparse_delta_linear(x, weight, bias, self._delta(parameter(self, "delta_values")))
        check_linear_inputs("DiffPruneLinear", x, weight, bias)
        delta = self.gate() * parameter(self, "diff_weight")
        if isinstance(weight, NF4Weight):
            return lora_linear(x, weight, bias, None, None, 0.0) + F.linear(x, delta.to(x.dtype))
        # W + δ formed in fp32 (δ's dtype) and rounded once to the input's dtype
        return F.linear(x, (weight + delta).to(x.dtype), None if bias is None else bias.to(x.dtype))

    def extra_repr(self) -> str:
        state = (f"projected, nnz={self.delta_values.numel()}" if self.projected
                 else f"structured={self.structured}, beta={self.beta:g}, gamma={self.gamma:g}, zeta={self.zeta:g}")
        return f"in_features={self.in_features}, out_features={self.out_features}, {state}, nf4={self.is_nf4}"

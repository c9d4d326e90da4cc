"""A stored sparse weight difference ``δ`` ``(out, in)``: DiffPruning's product after projection.

DiffPruning fine-tunes ``W + z ⊙ w`` and then fixes a mask keeping a small share of the entries (0.5 % in
the paper); what is served is ``y = x Wᵀ + b + x δᵀ`` with that sparse ``δ``. :class:`SparseDelta` holds ``δ``
row-compressed (CSR):

- ``row_ptr`` int64 ``(out + 1,)``: row ``o``'s entries are ``row_ptr[o] : row_ptr[o + 1]``; ``row_ptr[0] == 0``,
  non-decreasing, ``row_ptr[out] == nnz``;
- ``col_idx`` int32 ``(nnz,)``: the input column of each entry, strictly ascending within a row, in ``[0, in)``;
- ``values`` ``(nnz,)`` floating point: the entries (a stored zero is an entry like any other);
- ``shape`` ``(out, in)``.

Safetensors layout (:meth:`SparseDelta.state_dict`, :meth:`SparseDelta.from_state_dict`): three tensors per
layer under one prefix, ``<prefix>row_ptr`` (int64), ``<prefix>col_idx`` (int32), ``<prefix>values`` (the
stored dtype); the shape is the layer's own ``(out_features, in_features)``, known to the loader from the base
model and passed in. Loading validates every property above (dtypes, 1-D, lengths, ``row_ptr`` from 0 to nnz
and monotone, columns in range and strictly ascending per row, finite values unless told otherwise) and
raises ``ValueError`` on the first violation, so no kernel ever reads out of bounds on a hostile file.

Construction checks the structure (tensor types, dtypes, dims, lengths, one device, contiguity) without
reading the tensors' contents; :meth:`SparseDelta.validate` checks the contents (it reads them: a device
synchronisation on CUDA). :meth:`from_dense` and :meth:`from_state_dict` produce validated deltas; a delta
built from hand-made tensors should be validated once before use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

__all__ = ["SparseDelta", "SparseDeltaBank"]

_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT32_MAX = torch.iinfo(torch.int32).max


def _check_shape(shape) -> tuple:
    if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ValueError(f"shape must be two non-negative ints (out, in), got {shape!r}")
    if shape[1] > _INT32_MAX + 1:
        raise ValueError(f"in_features {shape[1]} does not fit int32 column indices")
    return int(shape[0]), int(shape[1])


def _check_tensor(name: str, t, dtypes: tuple, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} dtype must be one of {dtypes}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_entries(col_idx, values) -> None:
    _check_tensor("col_idx", col_idx, (torch.int32,), 1)
    _check_tensor("values", values, _VALUE_DTYPES, 1)
    if col_idx.numel() != values.numel():
        raise ValueError(f"col_idx ({col_idx.numel()}) and values ({values.numel()}) must have one entry per stored "
                         "element each")


def _check_one_device(*tensors) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"row_ptr, col_idx and values must be on one device, got {sorted(map(str, devices))}")


@dataclass(frozen=True, eq=False)
class SparseDelta:
    """A sparse ``(out, in)`` weight difference in CSR form (see the module docstring)."""

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    values: torch.Tensor
    shape: tuple
    # tensors derived from the pattern alone (row of each entry, the transposed pattern), made at first use and
    # shared by every delta with this pattern on this device (``with_values``); each entry is a pure function
    # of the pattern, so two threads that race to fill one write equal values
    _pattern_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        out_features, in_features = _check_shape(self.shape)
        object.__setattr__(self, "shape", (out_features, in_features))
        _check_tensor("row_ptr", self.row_ptr, (torch.int64,), 1)
        _check_entries(self.col_idx, self.values)
        if self.row_ptr.numel() != out_features + 1:
            raise ValueError(f"row_ptr must have out + 1 = {out_features + 1} entries, got {self.row_ptr.numel()}")
        _check_one_device(self.row_ptr, self.col_idx, self.values)

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, delta: torch.Tensor, mask: Optional[torch.Tensor] = None) -> "SparseDelta":
        """The entries of the dense ``(out, in)`` ``delta`` where ``mask`` (bool, same shape) is true, or where
        ``delta != 0`` without a mask; a masked-in zero is stored. Values keep ``delta``'s dtype (detached)."""
        if not isinstance(delta, torch.Tensor) or delta.dim() != 2:
            raise ValueError(f"delta must be a 2-D tensor (out, in), got {getattr(delta, 'shape', type(delta))}")
        if delta.dtype not in _VALUE_DTYPES:
            raise TypeError(f"delta dtype must be one of {_VALUE_DTYPES}, got {delta.dtype}")
        delta = delta.detach()
        if mask is None:
            keep = delta != 0
        else:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != delta.shape:
                raise ValueError(f"mask must be a bool tensor of delta's shape {tuple(delta.shape)}, got "
                                 f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}")
            if mask.device != delta.device:
                raise ValueError(f"delta is on {delta.device}, mask on {mask.device}")
            keep = mask
        out_features, in_features = delta.shape
        rows, cols = keep.nonzero(as_tuple=True)  # row-major order: ascending columns within each row
        row_ptr = torch.zeros(out_features + 1, dtype=torch.int64, device=delta.device)
        torch.cumsum(torch.bincount(rows, minlength=out_features), 0, out=row_ptr[1:])
        return cls(row_ptr, cols.to(torch.int32), delta[rows, cols].contiguous(), (out_features, in_features))

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], prefix: str, shape: tuple,
                        check_finite: bool = True) -> "SparseDelta":
        """The delta stored under ``prefix`` in ``tensors`` (e.g. a loaded safetensors file) for a layer of
        ``shape`` ``(out, in)``, validated (:meth:`validate`; ``check_finite=False`` admits NaN / inf values).
        The tensors are used as they are (no copy) when contiguous."""
        parts = {}
        for name in ("row_ptr", "col_idx", "values"):
            key = prefix + name
            if key not in tensors:
                raise ValueError(f"sparse delta {prefix!r}: missing tensor {key!r}")
            t = tensors[key]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"sparse delta {prefix!r}: {key!r} is not a tensor ({type(t).__name__})")
            parts[name] = t.contiguous()
        try:
            delta = cls(parts["row_ptr"], parts["col_idx"], parts["values"], tuple(shape))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sparse delta {prefix!r}: {exc}") from exc
        return delta.validate(check_finite=check_finite, name=prefix)

    def validate(self, check_finite: bool = True, name: str = "") -> "SparseDelta":
        """Check the contents: ``row_ptr`` starts at 0, never decreases and ends at nnz; every column is in
        ``[0, in)`` and columns ascend strictly within each row; with ``check_finite`` every value is finite.
        Returns ``self``; raises ``ValueError`` naming the first violation. Reads the tensors (on CUDA, a sync)."""
        where = f"sparse delta {name!r}: " if name else "sparse delta: "
        out_features, in_features = self.shape
        row_ptr, col_idx, nnz = self.row_ptr, self.col_idx, self.nnz
        if int(row_ptr[0]) != 0:
            raise ValueError(f"{where}row_ptr[0] must be 0, got {int(row_ptr[0])}")
        if int(row_ptr[-1]) != nnz:
            raise ValueError(f"{where}row_ptr[-1] must be nnz = {nnz}, got {int(row_ptr[-1])}")
        counts = row_ptr.diff()
        if counts.numel() and int(counts.min()) < 0:
            row = int((counts < 0).nonzero()[0])
            raise ValueError(f"{where}row_ptr decreases at row {row} ({int(row_ptr[row])} -> {int(row_ptr[row + 1])})")
        if nnz:
            low, high = int(col_idx.min()), int(col_idx.max())
            if low < 0 or high >= in_features:
                raise ValueError(f"{where}column indices must be in [0, {in_features}), got range [{low}, {high}]")
            rows = self.rows
            bad = (col_idx[1:] <= col_idx[:-1]) & (rows[1:] == rows[:-1])
            if bool(bad.any()):
                j = int(bad.nonzero()[0]) + 1
                raise ValueError(f"{where}columns must ascend strictly within a row: row {int(rows[j])} has column "
                                 f"{int(col_idx[j])} after {int(col_idx[j - 1])}")
            if check_finite and not bool(torch.isfinite(self.values).all()):
                j = int((~torch.isfinite(self.values)).nonzero()[0])
                raise ValueError(f"{where}value {j} is {float(self.values[j])} (check_finite=False admits it)")
        return self

    # --- properties -----------------------------------------------------------------------------------------------

    @property
    def nnz(self) -> int:
        """The number of stored entries."""
        return self.values.numel()

    @property
    def density(self) -> float:
        """``nnz / (out · in)`` (0 for an empty shape)."""
        total = self.shape[0] * self.shape[1]
        return self.nnz / total if total else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of the three stored tensors."""
        return sum(t.numel() * t.element_size() for t in (self.row_ptr, self.col_idx, self.values))

    def _cached(self, key: str, build):
        value = self._pattern_cache.get(key)
        if value is None:
            # plain tensors (not inference tensors, no graph) whatever mode the first caller is in
            with torch.inference_mode(False), torch.no_grad():
                value = build()
            self._pattern_cache[key] = value
        return value

    @property
    def rows(self) -> torch.Tensor:
        """int64 ``(nnz,)``: the output row of each entry."""
        return self._cached("rows", lambda: torch.repeat_interleave(
            torch.arange(self.shape[0], device=self.device), self.row_ptr.diff(), output_size=self.nnz))

    @property
    def col_idx_int64(self) -> torch.Tensor:
        """``col_idx`` as int64 (the index dtype of torch's CSR tensors, which take one dtype for both)."""
        return self._cached("col_idx_int64", lambda: self.col_idx.long())

    def transposed_pattern(self) -> tuple:
        """``(row_ptr_t, col_idx_t, order)``: the CSR pattern of ``δᵀ`` ``(in, out)`` (int64, int32) and the int64
        permutation with ``values_t = values[order]``, for the products with ``δ`` itself (``dy δ``)."""
        def build():
            out_features, in_features = self.shape
            cols = self.col_idx_int64
            # stable sort by column: entries of one column keep ascending rows
            order = torch.sort(cols, stable=True).indices
            row_ptr_t = torch.zeros(in_features + 1, dtype=torch.int64, device=self.device)
            torch.cumsum(torch.bincount(cols, minlength=in_features), 0, out=row_ptr_t[1:])
            return row_ptr_t, self.rows[order].to(torch.int32), order
        return self._cached("transposed", build)

    def transpose(self) -> "SparseDelta":
        """``δᵀ`` ``(in, out)`` as a :class:`SparseDelta` (the values permuted, the pattern cached)."""
        row_ptr_t, col_idx_t, order = self.transposed_pattern()
        return SparseDelta(row_ptr_t, col_idx_t, self.values[order], (self.shape[1], self.shape[0]))

    # --- conversions ----------------------------------------------------------------------------------------------

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``(out, in)`` ``δ`` in ``dtype`` (default: the values' dtype), zeros off the pattern;
        differentiable with respect to ``values``."""
        dtype = self.dtype if dtype is None else dtype
        dense = torch.zeros(self.shape, dtype=dtype, device=self.device)
        return dense.index_put((self.rows, self.col_idx_int64), self.values.to(dtype))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "SparseDelta":
        """A copy on ``device`` with values in ``dtype`` (the indices keep their dtypes); ``self`` when nothing
        changes."""
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        if device == self.device and dtype == self.dtype:
            return self
        same_device = device == self.device
        return SparseDelta(self.row_ptr.to(device), self.col_idx.to(device), self.values.to(device, dtype),
                           self.shape, self._pattern_cache if same_device else {})

    def with_values(self, values: torch.Tensor) -> "SparseDelta":
        """The same pattern with new ``values`` ``(nnz,)`` (floating point, on this device; any dtype). The tensor
        is used as it is, so a trainable ``values`` keeps its graph."""
        if not isinstance(values, torch.Tensor) or values.shape != (self.nnz,):
            raise ValueError(f"values must be ({self.nnz},), got {tuple(getattr(values, 'shape', ()))}")
        if values.device != self.device:
            raise ValueError(f"the pattern is on {self.device}, values on {values.device}")
        return SparseDelta(self.row_ptr, self.col_idx, values, self.shape, self._pattern_cache)

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        """Add ``δ`` into the dense ``(out, in)`` ``weight`` in place (for serving the merged layer at the base's
        cost); returns the weight's entries at the pattern as they were before, ``(nnz,)`` in its dtype, which
        :meth:`unmerge_from` restores exactly. Each touched entry is ``W + δ`` formed in float64 and rounded once
        to the weight's dtype; the others are untouched."""
        self._check_mergeable(weight)
        index = (self.rows, self.col_idx_int64)
        with torch.no_grad():
            original = weight[index]
            weight.index_put_(index, (original.double() + self.values.detach().double()).to(weight.dtype))
        return original

    def unmerge_from(self, weight: torch.Tensor, original: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Undo :meth:`merge_into` in place; returns ``weight``. With ``original`` (what ``merge_into`` returned) the
        pattern's entries are restored bit for bit. Without it ``δ`` is subtracted (float64, one rounding): in
        fp32 / bf16 / fp16 that is the base only up to the rounding of the merge and of the subtraction (``W ⊕ δ ⊖
        δ`` differs from ``W`` by up to one unit in the last place where ``W + δ`` was rounded: most entries in bf16
        when ``|δ|`` is near ``|W|``)."""
        self._check_mergeable(weight)
        index = (self.rows, self.col_idx_int64)
        with torch.no_grad():
            if original is not None:
                if not isinstance(original, torch.Tensor) or original.shape != (self.nnz,) \
                        or original.dtype != weight.dtype or original.device != weight.device:
                    raise ValueError(f"original must be what merge_into returned: ({self.nnz},) {weight.dtype} on "
                                     f"{weight.device}, got {getattr(original, 'dtype', type(original))} "
                                     f"{tuple(getattr(original, 'shape', ()))}")
                weight.index_put_(index, original)
            else:
                weight.index_put_(index, (weight[index].double() - self.values.detach().double()).to(weight.dtype))
        return weight

    def _check_mergeable(self, weight: torch.Tensor) -> None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or tuple(weight.shape) != self.shape:
            raise ValueError(f"weight must be a dense {self.shape} tensor, got {getattr(weight, 'shape', type(weight))}"
                             " (an NF4 base cannot hold a merged delta: serve it with sparse_delta_linear)")
        if weight.dtype not in _VALUE_DTYPES:
            raise TypeError(f"weight dtype must be one of {_VALUE_DTYPES}, got {weight.dtype}")
        if weight.device != self.device:
            raise ValueError(f"the delta is on {self.device}, the weight on {weight.device}")

    def state_dict(self, prefix: str = "") -> dict:
        """``{prefix + "row_ptr", prefix + "col_idx", prefix + "values"}`` (the safetensors layout of the module
        docstring; detached tensors, as stored)."""
        return {prefix + "row_ptr": self.row_ptr, prefix + "col_idx": self.col_idx,
                prefix + "values": self.values.detach()}

    def __repr__(self) -> str:
        return (f"SparseDelta(shape={self.shape}, nnz={self.nnz}, density={self.density:.4%}, dtype={self.dtype}, "
                f"device={self.device})")


@dataclass(frozen=True, eq=False)
class SparseDeltaBank:
    """The deltas of one layer, ``D`` of them, packed for a batch whose rows each name one (``-1``: none).

    ``row_ptr`` int64 ``(D, out + 1)``: delta ``k``'s row pointers as absolute positions in the concatenated
    ``col_idx`` int32 / ``values`` ``(total nnz,)`` (delta ``k``'s entries are ``offsets[k] : offsets[k + 1]``,
    ``row_ptr[k, 0] == offsets[k]``); ``shape`` ``(out, in)``; ``offsets`` the ``D + 1`` entry offsets as Python
    ints (host-side, so that no device sync is needed to slice one delta out). Build it with :meth:`from_deltas`;
    like a :class:`SparseDelta` it is immutable."""

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    values: torch.Tensor
    shape: tuple
    offsets: tuple
    _deltas: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        out_features, in_features = _check_shape(self.shape)
        object.__setattr__(self, "shape", (out_features, in_features))
        num = len(self.offsets) - 1
        _check_tensor("row_ptr", self.row_ptr, (torch.int64,), 2)
        _check_entries(self.col_idx, self.values)
        if num < 0 or self.offsets[0] != 0 or self.offsets[-1] != self.col_idx.numel() \
                or any(b < a for a, b in zip(self.offsets[:-1], self.offsets[1:])):
            raise ValueError(f"offsets must ascend from 0 to the entry count {self.col_idx.numel()}, got {self.offsets}")
        if tuple(self.row_ptr.shape) != (num, out_features + 1):
            raise ValueError(f"row_ptr must be ({num}, {out_features + 1}), got {tuple(self.row_ptr.shape)}")
        _check_one_device(self.row_ptr, self.col_idx, self.values)

    @classmethod
    def from_deltas(cls, deltas: Sequence[SparseDelta], dtype: Optional[torch.dtype] = None) -> "SparseDeltaBank":
        """Pack ``deltas`` (one shape and device), values in ``dtype`` (default: the promoted dtype of theirs)."""
        deltas = list(deltas)
        if not deltas or not all(isinstance(d, SparseDelta) for d in deltas):
            raise ValueError("from_deltas needs one or more SparseDelta")
        shape, device = deltas[0].shape, deltas[0].device
        for k, d in enumerate(deltas):
            if d.shape != shape or d.device != device:
                raise ValueError(f"delta {k} is {d.shape} on {d.device}; delta 0 is {shape} on {device}")
        if dtype is None:
            dtype = deltas[0].dtype
            for d in deltas[1:]:
                dtype = torch.promote_types(dtype, d.dtype)
        offsets = [0]
        for d in deltas:
            offsets.append(offsets[-1] + d.nnz)
        row_ptr = torch.stack([d.row_ptr + start for d, start in zip(deltas, offsets)])
        return cls(row_ptr, torch.cat([d.col_idx for d in deltas]),
                   torch.cat([d.values.detach().to(dtype) for d in deltas]), tuple(shape), tuple(offsets))

    @property
    def num_deltas(self) -> int:
        return len(self.offsets) - 1

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def validate(self, check_finite: bool = True) -> "SparseDeltaBank":
        """:meth:`SparseDelta.validate` of every delta (their row pointers relative to their own offsets: each must
        start at its offset and end at the next); returns ``self``."""
        for k in range(self.num_deltas):
            self.delta(k).validate(check_finite, name=f"bank delta {k}")
        return self

    def delta(self, k: int) -> SparseDelta:
        """Delta ``k`` as a :class:`SparseDelta` (views of the bank's tensors; made once)."""
        found = self._deltas.get(k)
        if found is None:
            if not 0 <= k < self.num_deltas:
                raise ValueError(f"delta {k} out of range: the bank holds {self.num_deltas}")
            start, end = self.offsets[k], self.offsets[k + 1]
            found = self._deltas[k] = SparseDelta(self.row_ptr[k] - start, self.col_idx[start:end],
                                                  self.values[start:end], self.shape)
        return found
